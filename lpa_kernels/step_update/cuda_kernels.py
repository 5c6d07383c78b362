"""CUDA C++ launchers of the fused per-step ops (``csrc/step_update.cu``): :class:`~lpa_kernels.
step_update.backends.StepLaunchers` on the extension (plumbing in ``lpa_kernels._cuda_launch``)."""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels._common import new_output
from lpa_kernels.step_update.naive import DIRECTIONS, RADII


def checked_label_plan(labels, num_classes, bad_range, sort):
    """``StepLaunchers.checked_label_plan``: one launch, or sorted in two (``csrc/step_update.cu``)."""
    B, device = labels.numel(), labels.device
    int64 = dict(dtype=torch.int64, device=device)
    safe, loss_labels = torch.empty(B, **int64), torch.empty(B, **int64)
    ok = torch.empty((), dtype=torch.bool, device=device)
    plan = torch.empty(B + num_classes + 2 * min(B, num_classes) + 2, **int64)
    # scratch: the sorted labels (sorted), or each class's next free place in the order
    scratch = torch.empty(B if sort else num_classes, **int64)
    cuda.launch("sorted_label_plan" if sort else "checked_label_plan", device, labels.data_ptr(),
                labels.element_size(), safe.data_ptr(), loss_labels.data_ptr(), ok.data_ptr(), bad_range.data_ptr(),
                plan.data_ptr(), scratch.data_ptr(), B, num_classes)
    return safe, loss_labels, ok, plan


def class_stats(stats, log_probs, labels, ok, accumulate):
    """``StepLaunchers.class_stats``."""
    B, K = log_probs.shape
    labels = labels.to(torch.int64)
    log_probs = log_probs.to(stats.dtype).contiguous()
    cuda.launch("class_stats", stats.device, stats.data_ptr(), log_probs.data_ptr(), labels.data_ptr(), ok.data_ptr(),
                B, K, accumulate, cuda.code(stats.dtype))


def policy(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction, radius, observe, clear,
           dtype):
    """``StepLaunchers.policy``; statistics in another dtype than ``dtype`` go through a copy."""
    K = stats.shape[1]
    kstats = stats if stats.dtype == dtype else stats.to(dtype)
    fixed_direction, fixed_eps = (None if t is None else t.to(dtype).contiguous() for t in (fixed_direction, fixed_eps))
    out_direction, out_eps = new_output((K,), dtype, stats.device), new_output((K,), dtype, stats.device)
    cuda.launch("policy", stats.device, kstats.data_ptr(), cuda.ptr(fixed_direction), cuda.ptr(fixed_eps),
                cuda.ptr(loss_ema), cuda.ptr(fall_ema), cuda.ptr(skipped), params.data_ptr(), out_direction.data_ptr(),
                out_eps.data_ptr(), K, DIRECTIONS[direction], RADII[radius], observe, clear, cuda.code(dtype))
    if clear and kstats is not stats:
        stats.zero_()
    return out_direction, out_eps
