"""The launcher contract of ``linear_perturb``'s fast backends, and the choice between them (see
``perturb/backends.py`` for the pattern). ``x (M, IN)`` with ``M = B * rows_per_label`` (row ``m``
reads ``delta[labels[m // rows_per_label]]``), ``weight (N, IN)``, ``bias (N,)`` or None,
``labels (B,)``, ``delta (K, N)``, all contiguous.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lpa_kernels.backend import serialised


class LinearPerturbLaunchers(Protocol):
    def linear_perturb_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               labels: torch.Tensor, rows_per_label: int, delta: torch.Tensor, activation: str,
                               mode: str, save_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (M, N), preact (M, N))`` in ``x.dtype`` (x and weight of one dtype); ``preact`` is an
        empty tensor unless ``save_preact``."""

    def linear_perturb_backward_epilogue(self, grad_out: torch.Tensor, preact: torch.Tensor, labels: torch.Tensor,
                                         rows_per_label: int, delta: torch.Tensor, activation: str,
                                         mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grad_preact (M, N) in grad_out.dtype, grad_bias (N,), grad_delta (K, N))``.

        ``preact`` may be empty for activation "none" with mode "add", which never reads it. ``grad_bias``
        and ``grad_delta`` are float32 (float64 for float64 ``grad_out``), reduced in a fixed order
        (deterministic, no atomics).
        """


def launchers(backend: str) -> LinearPerturbLaunchers:
    """The launchers of a resolved fast ``backend`` ("triton" or "cuda")."""
    if backend == "cuda":
        from lpa_kernels.linear_perturb import cuda_kernels as chosen
    else:
        from lpa_kernels.linear_perturb import triton_kernels as chosen
    return serialised(chosen)
