"""The definition of ``pgd_step_`` and ``class_grad_pgd_step_`` in plain PyTorch (the reference backend).

``delta (K, *P)``, ``grad (K, *P)``; ``step_size``, ``eps``, ``direction`` are ``(K,)`` tensors.
- ``linf``: ``delta_c <- clamp(delta_c + step_c * dir_c * sign(g_c), -eps_c, eps_c)``
- ``l2``:   ``delta_c <- delta_c + step_c * dir_c * g_c / (||g_c|| + 1e-12)``, then scaled back onto
  ``||delta_c|| <= eps_c`` when outside it.
A class whose gradient is exactly zero everywhere (absent from the batch) keeps its delta unchanged,
projection included; a NaN gradient is not zero and propagates.
"""

from __future__ import annotations

import torch

from lpa_kernels._common import compute_dtype
from lpa_kernels.perturb.naive import class_grad


def pgd_step_(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    norm: str = "linf",
) -> torch.Tensor:
    cd = compute_dtype(delta.dtype, grad.dtype)
    k = delta.shape[0]
    d, g = delta.detach().reshape(k, -1).to(cd), grad.detach().reshape(k, -1).to(cd)
    step, eps, direction = (v.to(cd).reshape(k, 1) for v in (step_size, eps, direction))
    if norm == "linf":
        sign = torch.where(torch.isnan(g), g, torch.sign(g))  # torch.sign(nan) is 0: keep the NaN
        new = torch.maximum(torch.minimum(d + step * direction * sign, eps), -eps)
    else:
        unit = g / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + 1e-12)
        new = d + step * direction * unit
        length = torch.linalg.vector_norm(new, dim=1, keepdim=True)
        new = torch.where(length > eps, new * (eps / length), new)
    active = (g != 0).any(dim=1, keepdim=True)
    with torch.no_grad():
        delta.copy_(torch.where(active, new, d).reshape(delta.shape))
    return delta


def class_grad_pgd_step_(
    delta: torch.Tensor,
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    norm: str = "linf",
    h: torch.Tensor | None = None,
    mode: str = "add",
) -> torch.Tensor:
    grad = class_grad(grad_out, labels, delta.shape[0], delta.shape, h=h, mode=mode)
    return pgd_step_(delta, grad, step_size, eps, direction, norm)
