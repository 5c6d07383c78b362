"""The label check and label plan of one batch in one launch (the kernel backends), shared by the LPA
training step (``lpa.labels``: its device-side check builds the step's plan), ``head_pgd_`` and the public
ops' class reductions, which build a plan per call when the caller passes none. Below the ops: it imports
no op, so every op may use it.

The plan is ``_common.label_plan``'s packed ``(order, starts, segment_class, segment_start)``; the one
launch replaces the ~13 ATen launches of its sort (argsort, gathers, cumsum, binary searches) and the
range check's, which on a GPU each cost a launch (``lpa-bench static`` counts both). Above
``ONE_LAUNCH_PLAN_MAX`` both backends sort instead, in two launches, for batches of up to
``SORTED_PLAN_MAX_B`` samples (LLM-vocabulary heads: B = 4096, K = 32,000); larger batches take the
definition's ops."""

from __future__ import annotations

import torch

from lpa_kernels.step_update import naive
from lpa_kernels.step_update.backends import launchers

# B x K up to which the kernel backends check the labels and build the plan in one launch, which runs as
# one program (on Triton a loop over B x K one-hot tiles, ~6 us at 1024 x 1000 on an H100, MODELLED; on CUDA
# one block, its class scan on one thread). Above it (LLM-vocabulary heads: B = 4096, K = 100,000 would be
# ~400,000 serial tile steps; on CUDA a class scan of K steps) the sorted plan (one program or block sorts
# the batch's keys, a grid finds the class starts: triton_kernels.py, csrc/step_update.cu) up to
# SORTED_PLAN_MAX_B samples (4096 int64 keys: 16 per thread over 8 warps, 32 KiB of the CUDA block's shared
# memory); beyond that naive's ops: the range check and
# _common.label_plan's sort, ~20 launches that run in parallel.
ONE_LAUNCH_PLAN_MAX = 1 << 21
SORTED_PLAN_MAX_B = 4096


@torch.library.custom_op("lpa_kernels::checked_label_plan_", mutates_args=("bad_range",))
def _checked_label_plan_op(labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor, backend: str,
                           sort: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launchers(backend).checked_label_plan(labels, num_classes, bad_range, sort)


@_checked_label_plan_op.register_fake
def _(labels, num_classes, bad_range, backend, sort):
    B = labels.shape[0]
    segments = min(B, num_classes)
    int64 = dict(dtype=torch.int64)
    return (labels.new_empty((B,), **int64), labels.new_empty((B,), **int64),
            labels.new_empty((), dtype=torch.bool), labels.new_empty((B + num_classes + 2 * segments + 2,), **int64))


def _kernel_sorts(batch: int, num_classes: int) -> bool | None:
    """How the kernel backends build the plan of ``batch`` labels of ``num_classes`` classes: False in one
    launch, True sorted in two, None not at all (the definition's ops)."""
    if batch * num_classes <= ONE_LAUNCH_PLAN_MAX:
        return False
    return True if batch <= SORTED_PLAN_MAX_B else None


def checked_labels(labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor, backend: str):
    """``(safe, loss_labels, ok, plan)`` of one training batch (``naive.checked_label_plan_``); the kernel
    backends build the step's label plan too (in the same launch up to ``ONE_LAUNCH_PLAN_MAX``, in two
    above it up to ``SORTED_PLAN_MAX_B`` samples), the reference backend none (None)."""
    if backend == "reference":
        return naive.checked_label_plan_(labels, num_classes, bad_range, with_plan=False)
    sort = _kernel_sorts(labels.numel(), num_classes)
    if sort is None:
        return naive.checked_label_plan_(labels, num_classes, bad_range)
    return _checked_label_plan_op(labels.contiguous(), num_classes, bad_range, backend, sort)


def call_plan(labels: torch.Tensor, num_classes: int, backend: str) -> torch.Tensor | None:
    """The plan of labels already checked on the host, for one call of an op on a kernel ``backend``, where
    the backend builds it (``checked_labels``; the bad-label record it also writes is thrown away), else
    None (the op sorts the labels itself, in as many launches as the definition would)."""
    if backend == "reference" or not labels.numel() or _kernel_sorts(labels.numel(), num_classes) is None:
        return None
    return checked_labels(labels, num_classes, torch.empty(2, dtype=torch.int64, device=labels.device), backend)[3]
