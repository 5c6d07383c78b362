"""The PGD loop of ``head_pgd_`` shared by the Triton and CUDA C++ launchers.

A backend supplies two callables: ``class_grad(current, p_true) -> grad (K, D)``, the class-summed
gradient at the iterate ``current`` (which also writes the per-sample true-class probabilities into
``p_true (B,)`` when it is not None), and its ``pgd_step`` launcher. LPL's confidence rule is applied
here, in PyTorch, once, from the first step's probabilities.
"""

from __future__ import annotations

from typing import Callable

import torch

from lpa_kernels._common import new_output
from lpa_kernels.confidence import confidence_direction


def run_pgd_loop(
    delta: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    step: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor | None,
    norm: str,
    acc: torch.dtype,
    class_grad: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    pgd_step: Callable[..., None],
) -> None:
    """``steps`` PGD steps on ``delta (K, D)`` in place; ``direction`` None means the confidence rule.
    The iterate stays in the accumulation dtype ``acc`` between steps and is rounded into ``delta`` once."""
    current = delta if delta.dtype == acc else delta.to(acc)
    p_true = new_output((labels.shape[0],), acc, delta.device) if direction is None else None
    for _ in range(steps):
        grad = class_grad(current, p_true)
        if direction is None:
            direction = confidence_direction(p_true, labels, delta.shape[0])[0].to(acc)
            p_true = None  # the rule is fixed from the first step
        pgd_step(current, grad, step, eps, direction, norm)
    if current is not delta:
        delta.copy_(current)
