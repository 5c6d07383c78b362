"""The launcher contract of ``head_pgd_``'s fast backends, and the choice between them (see
``perturb/backends.py`` for the pattern). Both backends run ``loop.run_head_pgd`` on their own
:class:`~lpa_kernels.head_pgd.loop.HeadKernels` (so does the reference backend, ``torch_kernels.py``,
outside the custom op).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lpa_kernels.backend import serialised


class HeadPGDLaunchers(Protocol):
    def head_pgd(self, h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 delta: torch.Tensor, steps: int, step: torch.Tensor, eps: torch.Tensor,
                 direction: torch.Tensor | None, norm: str, mode: str, plan: torch.Tensor | None = None,
                 ok: torch.Tensor | None = None, skipped: torch.Tensor | None = None) -> None:
        """``steps`` PGD steps on ``delta (K, D)`` in place (``loop.run_head_pgd``): ``h (B, D)``,
        ``labels (B,)``, ``weight (K, D)``, ``bias (K,)`` or None, contiguous and validated; ``step``,
        ``eps`` ``(K,)``; ``direction`` ``(K,)`` or None for LPL's confidence rule; ``plan`` the
        labels' ``_common.label_plan`` or None; with ``skipped`` (0-d int64), under ``loop.guarded``'s
        rule (``ok`` 0-d bool or None)."""


def launchers(backend: str) -> HeadPGDLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.head_pgd import cuda_kernels as chosen
    else:
        from lpa_kernels.head_pgd import triton_kernels as chosen
    return serialised(chosen)
