"""The launcher contract of ``perturb`` and ``class_grad``'s fast backends, and the choice between them.

:class:`PerturbLaunchers` is declared once, here; ``triton_kernels.py`` and ``cuda_kernels.py`` are
modules that provide it (``tests/test_architecture.py`` checks their signatures against it), and
``op.py`` reaches them through :func:`launchers`. Tensors are flattened and contiguous: ``h (B, F)``,
``labels (B,)``, ``delta (K, D)``, and feature ``f`` of a sample reads ``delta[y, (f // inner) % D]``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lpa_kernels.backend import serialised


class PerturbLaunchers(Protocol):
    def perturb_forward(self, h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, inner: int,
                        mode: str) -> torch.Tensor:
        """``h (B, F)``, ``labels (B,)``, ``delta (K, D)`` contiguous -> ``h~ (B, F)`` in ``h.dtype``."""

    def perturb_backward(self, grad_out: torch.Tensor, h: torch.Tensor | None, labels: torch.Tensor,
                         delta: torch.Tensor | None, num_classes: int, per_class: int, inner: int, mode: str,
                         need_grad_h: bool, grad_delta_dtype: torch.dtype,
                         plan: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(grad_h (B, F) or None, grad_delta (K, D))`` in one pass over ``grad_out (B, F)``.

        ``plan``: ``_common.label_plan(labels, num_classes)`` when the caller built it (once for several
        calls on the same labels); otherwise the launcher sorts the labels itself.

        ``h`` is needed for ``scale``; ``delta`` only when ``need_grad_h`` in ``scale``. ``grad_h`` has
        ``grad_out.dtype``, ``grad_delta`` has ``grad_delta_dtype``; classes absent from the batch get
        zero. Deterministic on every backend (a fixed-order reduction; no value is added atomically), so
        the result is the same from run to run with or without ``torch.use_deterministic_algorithms``.
        """


def launchers(backend: str) -> PerturbLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.perturb import cuda_kernels as chosen
    else:
        from lpa_kernels.perturb import triton_kernels as chosen
    return serialised(chosen)
