"""lpa_kernels: fused kernels for LPA (Learning to Perturb Activations).

Public functional API (SPEC section 2): ``perturb``, ``linear_perturb``, ``class_grad``,
``pgd_step_``, ``class_grad_pgd_step_``, ``head_pgd_`` and ``backend_info``.
"""

__version__ = "0.1.0"

from lpa_kernels.backend import backend_info
from lpa_kernels.head_pgd.op import head_pgd_
from lpa_kernels.linear_perturb.op import linear_perturb
from lpa_kernels.perturb.op import class_grad, perturb
from lpa_kernels.pgd.op import class_grad_pgd_step_, pgd_step_

__all__ = [
    "backend_info",
    "class_grad",
    "class_grad_pgd_step_",
    "head_pgd_",
    "linear_perturb",
    "perturb",
    "pgd_step_",
]
