"""``LPALinear``: ``act(x @ W.T + b)`` followed by the per-class perturbation, in one fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lpa_kernels import _checks, linear_perturb
from lpa_kernels._common import compute_dtype
from lpa_kernels.linear_perturb.naive import ACTIVATION_FNS
from lpa_kernels.nn.perturbation import ClassPerturbation


class LPALinear(nn.Linear):
    """A linear layer with activation whose output carries LPA's per-class perturbation in training.

    Training with labels: ``linear_perturb(x, weight, bias, labels, delta, activation, mode)`` (the GEMM
    epilogue applies the activation and the perturbation; the backward also yields the class gradient);
    eval mode or no labels: plain ``act(x @ weight.T + bias)``. ``x (B, in)`` or ``(B, T, in)``. The
    perturbation lives in ``self.perturbation`` (a ``ClassPerturbation`` of shape ``(K, out)``);
    ``step()`` applies its single-pass PGD update after the backward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_classes: int,
        activation: str = "relu",
        mode: str = "add",
        bias: bool = True,
        eps: float | torch.Tensor = 1.0,
        step_size: float | torch.Tensor = 0.25,
        direction: float | torch.Tensor = 1.0,
        norm: str = "l2",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
        self.backend = backend
        self.perturbation = ClassPerturbation(
            num_classes, (out_features,), mode=mode, eps=eps, step_size=step_size, direction=direction,
            norm=norm, backend=backend, device=device,
            dtype=compute_dtype(self.weight.dtype),  # delta accumulates in fp32 (fp64 for a float64 layer)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or labels is None:
            return ACTIVATION_FNS[self.activation](F.linear(x, self.weight, self.bias))
        delta = self.perturbation.live_delta()
        return linear_perturb(x, self.weight, self.bias, labels, delta, self.activation, self.perturbation.mode, backend=self.backend)

    def step(self, *args, **kwargs) -> bool:
        """``ClassPerturbation.step`` on this layer's perturbation."""
        return self.perturbation.step(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, num_classes={self.perturbation.num_classes}"
