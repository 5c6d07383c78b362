"""The launcher contract of ``pgd_step_`` and ``class_grad_pgd_step_``'s fast backends, and the choice
between them (see ``perturb/backends.py`` for the pattern). Both launchers update a contiguous
``delta (K, D)`` in place; ``step``, ``eps`` and ``direction`` are ``(K,)`` tensors in delta's compute
dtype (``_common.per_class``), validated by the op.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from lpa_kernels.backend import serialised


class PGDLaunchers(Protocol):
    def pgd_step(self, delta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, eps: torch.Tensor,
                 direction: torch.Tensor, norm: str, ok: torch.Tensor | None = None,
                 skipped: torch.Tensor | None = None, rounded: torch.Tensor | None = None) -> None:
        """One PGD step on ``delta (K, D)`` (contiguous, in place) from ``grad (K, D)``. With ``ok`` (0-d
        bool) and ``skipped`` (0-d int64): the training step's guarded step (``naive.guarded_pgd_step_``:
        a class with a non-finite gradient, or every class when ``ok`` is False, keeps its delta; the
        former are counted into ``skipped`` in place). With ``rounded`` (K, D) (contiguous, any float
        dtype): the new ``delta`` also into it, every row (``head_pgd_``'s class space keeps its GEMM
        operand so, without a launch of its own where the kernel can write it)."""

    def class_grad_pgd_step(self, delta: torch.Tensor, grad_out: torch.Tensor, labels: torch.Tensor,
                            h: torch.Tensor | None, step: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor,
                            inner: int, mode: str, norm: str, plan: torch.Tensor | None = None) -> None:
        """``pgd_step(delta, class_grad(grad_out (B, F), labels, h), ...)`` in one launch, ``delta (K, D)``
        contiguous and updated in place; ``h (B, F)`` for ``scale``, else None; ``plan`` the labels'
        ``_common.label_plan`` or None. ``prepare_class_grad_pgd_step(...)(step, eps, direction)``."""

    def prepare_class_grad_pgd_step(self, delta: torch.Tensor, grad_out: torch.Tensor, labels: torch.Tensor,
                                    h: torch.Tensor | None, inner: int, mode: str, norm: str,
                                    plan: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor], None]:
        """``class_grad_pgd_step`` in two parts: everything that depends on the labels and shapes only
        (class order, launch plan, buffers, zeroed arrival counters), built here once, and the returned
        ``launch(step, eps, direction)``, the update itself, which may run any number of times on the
        same ``delta`` and ``grad_out`` tensors (their values may change in between; those of ``labels``,
        ``h`` and ``plan`` may not: a launcher may hold copies of them), one at a time on one stream. A
        PGD loop (``head_pgd_``'s rows form) launches it every step."""


def launchers(backend: str) -> PGDLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.pgd import cuda_kernels as chosen
    else:
        from lpa_kernels.pgd import triton_kernels as chosen
    return serialised(chosen)
