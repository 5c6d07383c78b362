"""The launcher contract of the fused per-step ops' fast backends, and the choice between them (see
``perturb/backends.py`` for the pattern). Inputs arrive contiguous; what each computes is ``naive.py``'s."""

from __future__ import annotations

from typing import Protocol

import torch

from lpa_kernels.backend import serialised


class StepLaunchers(Protocol):
    def checked_label_plan(self, labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor, sort: bool):
        """``naive.checked_label_plan_`` with the plan: ``(safe, loss_labels, ok, plan)``, ``bad_range``
        updated in place; ``sort``: by sorting the labels, in two launches (``plan.SORTED_PLAN_MAX_B`` samples
        at most), else in one."""

    def class_stats(self, stats: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                    accumulate: bool) -> None:
        """``naive.class_stats_`` into ``stats (3, K)`` in place (``log_probs (B, K)`` rows contiguous)."""

    def policy(self, stats: torch.Tensor, fixed_direction: torch.Tensor | None, fixed_eps: torch.Tensor | None,
               loss_ema: torch.Tensor | None, fall_ema: torch.Tensor | None, skipped: torch.Tensor | None,
               params: torch.Tensor, direction: str, radius: str, observe: bool, clear: bool,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``naive.policy_``: new ``(direction, eps)``, the state tensors updated in place."""


def launchers(backend: str) -> StepLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.step_update import cuda_kernels as chosen
    else:
        from lpa_kernels.step_update import triton_kernels as chosen
    return serialised(chosen)
