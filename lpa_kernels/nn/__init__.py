"""Modules: ``ClassPerturbation`` (a per-class perturbation you place in a model) and ``LPALinear``
(a linear layer + activation + per-class perturbation in one fused kernel)."""

from lpa_kernels.nn.linear import LPALinear
from lpa_kernels.nn.perturbation import ClassPerturbation

__all__ = ["ClassPerturbation", "LPALinear"]
