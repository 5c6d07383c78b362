"""Public ``head_pgd_``: T PGD steps on delta when the upper network is a linear classifier."""

from __future__ import annotations

import torch

from lpa_kernels import _checks, backend as _backend
from lpa_kernels.head_pgd import naive
from lpa_kernels.pgd.op import _check_pgd_args


def head_pgd_(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    direction: float | torch.Tensor | str = 1.0,
    norm: str = "l2",
    mode: str = "add",
    backend: str = "auto",
) -> torch.Tensor:
    """``steps`` PGD steps on ``delta (K, D)`` in place, for ``logits = perturb(h, y, delta) @ W.T + b``
    with summed cross-entropy. ``h (B, D)``, ``weight (K, D)``, ``bias (K,)`` or None. ``direction``
    is a float, a ``(K,)`` tensor or ``"confidence"`` (LPL's rule from the first step's softmax).
    Returns ``delta``."""
    _checks.check_float("h", h)
    _checks.check_float("weight", weight)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_choice("mode", mode, _checks.MODES)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    confidence = isinstance(direction, str)
    if confidence:
        _checks.check_choice("direction", direction, ("confidence",))
    step, radius, sign = _check_pgd_args(delta, step_size, eps, 1.0 if confidence else direction, norm)
    if h.dim() != 2:
        raise ValueError(f"h must have shape (B, D), got {tuple(h.shape)}")
    k, d = delta.shape[0], h.shape[1]
    if weight.dim() != 2 or tuple(weight.shape) != (k, d):
        raise ValueError(f"weight must have shape (K, D) = ({k}, {d}) to match delta and h, got {tuple(weight.shape)}")
    if tuple(delta.shape) != (k, d):
        raise ValueError(f"delta must have shape (K, D) = ({k}, {d}), got {tuple(delta.shape)}")
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias must have shape ({k},) or be None, got {tuple(bias.shape)}")
    device = _checks.check_same_device(h=h, labels=labels, weight=weight, bias=bias, delta=delta)
    _checks.check_labels(labels, h.shape[0], k)
    backend = _backend.resolve(backend, device)
    direction = "confidence" if confidence else sign
    if backend == "reference":
        return naive.head_pgd_(h, labels, weight, bias, delta, steps, step, radius, direction, norm, mode)
    raise ValueError(f"backend={backend!r} for head_pgd_ is not implemented yet")
