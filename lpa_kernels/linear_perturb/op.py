"""Public ``linear_perturb``: validation, dispatch and the custom ops of the fused GEMM."""

from __future__ import annotations

import torch

from lpa_kernels import _checks, backend as _backend
from lpa_kernels.linear_perturb import naive


def _check_linear_perturb_args(x, weight, bias, labels, delta, activation, mode, backend) -> str:
    _checks.check_float("x", x)
    _checks.check_float("weight", weight)
    _checks.check_float("delta", delta)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_choice("activation", activation, _checks.ACTIVATIONS)
    _checks.check_choice("mode", mode, _checks.MODES)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape (B, in) or (B, T, in), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (out, {x.shape[-1]}) to match x's last dim, got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},) or be None, got {tuple(bias.shape)}")
    if delta.dim() != 2 or delta.shape[1] != out_features or delta.shape[0] < 1:
        raise ValueError(f"delta must have shape (K, {out_features}) with K >= 1, got {tuple(delta.shape)}")
    device = _checks.check_same_device(x=x, weight=weight, bias=bias, labels=labels, delta=delta)
    _checks.check_labels(labels, x.shape[0], delta.shape[0])
    return _backend.resolve(backend, device)


def linear_perturb(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    delta: torch.Tensor,
    activation: str = "relu",
    mode: str = "add",
    backend: str = "auto",
) -> torch.Tensor:
    """``perturb(act(x @ weight.T + bias), labels, delta, mode)`` in one fused kernel.

    ``x (B, in)`` or ``(B, T, in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``labels (B,)``,
    ``delta (K, out)``; returns ``(B, out)`` or ``(B, T, out)`` in ``x.dtype``. ``activation`` is one of
    ``none``, ``relu``, ``gelu``, ``gelu_tanh``, ``silu``. Differentiable in x, weight, bias and delta.
    """
    backend = _check_linear_perturb_args(x, weight, bias, labels, delta, activation, mode, backend)
    if backend == "reference":
        return naive.linear_perturb(x, weight, bias, labels, delta, activation, mode)
    raise ValueError(f"backend={backend!r} for linear_perturb is not implemented yet")
