"""The definition of ``linear_perturb`` in plain PyTorch (the reference backend).

``x (B, in)`` or ``(B, T, in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``labels (B,)``,
``delta (K, out)``: ``perturb(act(x @ weight.T + bias), labels, delta, mode)``, each sample's label
applying to all its ``T`` rows. Arithmetic in float32 (float64 for float64 inputs), rounded once to
``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lpa_kernels._common import compute_dtype
from lpa_kernels.perturb.naive import perturb

ACTIVATION_FNS = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def linear_perturb(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    delta: torch.Tensor,
    activation: str = "relu",
    mode: str = "add",
) -> torch.Tensor:
    cd = compute_dtype(x.dtype, weight.dtype, delta.dtype)
    z = F.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    a = ACTIVATION_FNS[activation](z)
    # For (B, T, out) activations, delta (K, out) broadcasts over T as a last-dim layout.
    return perturb(a, labels, delta.to(cd), mode).to(x.dtype)
