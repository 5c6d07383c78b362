"""The label check and label plan of one batch in one launch (the kernel backends), shared by the LPA
training step (``lpa.labels``: its device-side check builds the step's plan), ``head_pgd_`` and the public
ops' class reductions, which build a plan per call when the caller passes none. Below the ops: it imports
no op, so every op may use it.

The plan is ``_common.label_plan``'s packed ``(order, starts, segment_class, segment_start)``; the one
launch replaces the ~13 ATen launches of its sort (argsort, gathers, cumsum, binary searches) and the
range check's, which on a GPU each cost a launch (``lpa-bench static`` counts both)."""

from __future__ import annotations

import torch

from lpa_kernels.step_update import naive
from lpa_kernels.step_update.backends import launchers

# B x K up to which the kernel backends check the labels and build the plan in one launch, which runs as
# one program (on Triton a loop over B x K one-hot tiles, ~6 us at 1024 x 1000 on an H100, MODELLED; on CUDA
# one block, its class scan on one thread); above it (LLM-vocabulary heads: B = 4096, K = 100,000 would be
# ~400,000 serial tile steps) naive's ops: the range check and _common.label_plan's sort, ~20 launches
# that run in parallel.
ONE_LAUNCH_PLAN_MAX = 1 << 21


@torch.library.custom_op("lpa_kernels::checked_label_plan_", mutates_args=("bad_range",))
def _checked_label_plan_op(labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launchers(backend).checked_label_plan(labels, num_classes, bad_range)


@_checked_label_plan_op.register_fake
def _(labels, num_classes, bad_range, backend):
    B = labels.shape[0]
    segments = min(B, num_classes)
    int64 = dict(dtype=torch.int64)
    return (labels.new_empty((B,), **int64), labels.new_empty((B,), **int64),
            labels.new_empty((), dtype=torch.bool), labels.new_empty((B + num_classes + 2 * segments + 2,), **int64))


def checked_labels(labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor, backend: str):
    """``(safe, loss_labels, ok, plan)`` of one training batch (``naive.checked_label_plan_``); the kernel
    backends build the step's label plan too (in the same launch up to ``ONE_LAUNCH_PLAN_MAX``), the
    reference backend none (None)."""
    if backend == "reference":
        return naive.checked_label_plan_(labels, num_classes, bad_range, with_plan=False)
    if labels.numel() * num_classes > ONE_LAUNCH_PLAN_MAX:
        return naive.checked_label_plan_(labels, num_classes, bad_range)
    return _checked_label_plan_op(labels.contiguous(), num_classes, bad_range, backend)


def call_plan(labels: torch.Tensor, num_classes: int, backend: str) -> torch.Tensor | None:
    """The plan of labels already checked on the host, for one call of an op on a kernel ``backend``: one
    launch up to ``ONE_LAUNCH_PLAN_MAX`` (the bad-label record it also writes is thrown away), else None
    (the op sorts the labels itself, in as many launches as the definition would)."""
    if backend == "reference" or not 0 < labels.numel() * num_classes <= ONE_LAUNCH_PLAN_MAX:
        return None
    return checked_labels(labels, num_classes, torch.empty(2, dtype=torch.int64, device=labels.device), backend)[3]
