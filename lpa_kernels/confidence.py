"""LPL's confidence rule, carried to activations (SPEC section 1).

``p_c`` is the mean softmax probability of the true class over the batch's samples of class ``c``;
``thr`` is the mean of ``p_c`` over the classes present. ``s_c = sign(thr - p_c)``: classes the model
is less sure of than average get positive augmentation (+1), the others negative (-1). Absent classes
get 0 (they have no gradient either), and so does a class that sits exactly on the threshold. A class
whose sum of probabilities is not finite (a NaN sample) counts as absent, so its NaN reaches no other
class (the rule of the training policies, ``step_update.naive.class_means``).
"""

from __future__ import annotations

import torch

from lpa_kernels._common import compute_dtype


def class_mean_true_prob(p_true: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """``(p_c (K,), present (K,) bool)`` from the per-sample true-class probabilities ``p_true (B,)``;
    ``p_c`` in ``p_true``'s compute dtype (float32, or float64 for float64 input), whatever the default
    dtype; a class with a non-finite sum is absent (p_c 0). Sums by ``index_add_`` (``bincount`` would
    sync the device)."""
    dtype = compute_dtype(p_true.dtype)
    p_true = p_true.detach().to(dtype)
    counts = torch.zeros(num_classes, dtype=dtype, device=p_true.device).index_add_(0, labels, torch.ones_like(p_true))
    sums = torch.zeros(num_classes, dtype=dtype, device=p_true.device).index_add_(0, labels, p_true)
    present = (counts > 0) & torch.isfinite(sums)
    return torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums)), present


def confidence_direction(p_true: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """``(direction (K,), magnitude (K,))``: ``direction = sign(thr - p_c)`` and
    ``magnitude = |thr - p_c| / max_c |thr - p_c|`` (0 for absent classes, all 0 when every gap is 0)."""
    return direction_from_class_means(*class_mean_true_prob(p_true, labels, num_classes))


def direction_from_class_means(p_c: torch.Tensor, present: torch.Tensor):
    """``(direction (K,), magnitude (K,))`` from the per-class mean true-class probabilities ``p_c`` and
    the mask of classes present; used where ``p_c`` is reduced over several processes first."""
    # Written without a device sync (no data-dependent Python branch): it runs once per training step.
    gap = confidence_gap(p_c, present)
    size = gap.abs()
    largest = size.amax() if gap.numel() else gap.new_zeros(())
    return torch.sign(gap), size / largest.clamp_min(torch.finfo(size.dtype).tiny)


def confidence_gap(p_c: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(K,)`` ``thr - p_c`` for the classes present (0 for the others), ``thr`` the mean of ``p_c`` over
    the classes present; no device sync."""
    weight = present.to(p_c.dtype)
    thr = (p_c * weight).sum() / weight.sum().clamp_min(1)
    return torch.where(present, thr - p_c, torch.zeros_like(p_c))
