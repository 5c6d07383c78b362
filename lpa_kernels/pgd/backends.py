"""The launcher contract of ``pgd_step_`` and ``class_grad_pgd_step_``'s fast backends, and the choice
between them (see ``perturb/backends.py`` for the pattern). Both launchers update a contiguous
``delta (K, D)`` in place; ``step``, ``eps`` and ``direction`` are ``(K,)`` tensors in delta's compute
dtype (``_common.per_class``), validated by the op.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lpa_kernels.backend import serialised


class PGDLaunchers(Protocol):
    def pgd_step(self, delta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, eps: torch.Tensor,
                 direction: torch.Tensor, norm: str, ok: torch.Tensor | None = None,
                 skipped: torch.Tensor | None = None) -> None:
        """One PGD step on ``delta (K, D)`` (contiguous, in place) from ``grad (K, D)``. With ``ok`` (0-d
        bool) and ``skipped`` (0-d int64): the training step's guarded step (``naive.guarded_pgd_step_``:
        a class with a non-finite gradient, or every class when ``ok`` is False, keeps its delta; the
        former are counted into ``skipped`` in place)."""

    def class_grad_pgd_step(self, delta: torch.Tensor, grad_out: torch.Tensor, labels: torch.Tensor,
                            h: torch.Tensor | None, step: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor,
                            inner: int, mode: str, norm: str) -> None:
        """``pgd_step(delta, class_grad(grad_out (B, F), labels, h), ...)`` in one launch, ``delta (K, D)``
        contiguous and updated in place; ``h (B, F)`` for ``scale``, else None."""


# The split grid's feature blocks: the smallest still moves a few hundred bytes per program, the largest
# is one pass of the one-program-per-class update.
SPLIT_BLOCKS = (64, 1024)
# Partials per (class, block) of the split grid's first phase, in this order: largest |g|,
# sum (g / largest)^2, sum delta * g / largest, sum delta^2, any g != 0, any g not finite (1 or 0).
N_STATS = 6


def split_block(num_classes: int, width: int, programs: int) -> int | None:
    """The feature block of ``pgd_step``'s (feature block, class) grid for ``num_classes`` rows of
    ``width`` entries, or None for one program per class. The split pays when the classes are fewer
    than the ``programs`` that fill the device (2 per multiprocessor) and a row spans several blocks;
    the block is then the largest power of two in ``SPLIT_BLOCKS`` that still gives that many programs
    (K = 10, D = 4096 on an H100's 132 multiprocessors: 128 entries, 320 programs)."""
    if num_classes >= programs:
        return None
    share = max(num_classes * width // programs, 1)
    block = min(SPLIT_BLOCKS[1], max(SPLIT_BLOCKS[0], 1 << (share.bit_length() - 1)))
    return block if width > block else None


def launchers(backend: str) -> PGDLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.pgd import cuda_kernels as chosen
    else:
        from lpa_kernels.pgd import triton_kernels as chosen
    return serialised(chosen)
