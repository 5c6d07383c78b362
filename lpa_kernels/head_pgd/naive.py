"""The definition of ``head_pgd_`` in plain PyTorch: the obvious autograd loop (the reference backend).

``h (B, D)``, ``labels (B,)``, ``weight (K, D)``, ``bias (K,)`` or None, ``delta (K, D)``. Each of the
``steps`` iterations takes the gradient of the summed cross-entropy of ``perturb(h, y, delta) @ W.T + b``
with respect to delta and applies ``pgd_step_``. ``direction == "confidence"`` is LPL's rule computed
from the first step's softmax (``lpa_kernels.confidence``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lpa_kernels._common import compute_dtype, l2_iterate_eps
from lpa_kernels.confidence import confidence_direction
from lpa_kernels.perturb.naive import perturb
from lpa_kernels.pgd.naive import pgd_step_


def head_pgd_(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    steps: int,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor | str,
    norm: str = "l2",
    mode: str = "add",
) -> torch.Tensor:
    cd = compute_dtype(h.dtype, weight.dtype, delta.dtype)
    h, w = h.detach().to(cd), weight.detach().to(cd)
    b = None if bias is None else bias.detach().to(cd)
    current = delta.detach().to(cd).clone()
    eps = l2_iterate_eps(eps.to(cd), delta.dtype, cd, norm)  # the iterate is rounded into delta after the steps
    k = delta.shape[0]
    for _ in range(steps):
        with torch.enable_grad():
            d = current.clone().requires_grad_(True)
            logits = F.linear(perturb(h, labels, d, mode), w, b)
            loss = F.cross_entropy(logits, labels.long(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, d)
        if isinstance(direction, str):  # "confidence", fixed from the first step's softmax
            p_true = logits.detach().softmax(dim=1).gather(1, labels[:, None].long())[:, 0]
            direction = confidence_direction(p_true, labels, k)[0].to(cd)
        pgd_step_(current, grad, step_size, eps, direction, norm)
    with torch.no_grad():
        delta.copy_(current)
    return delta
