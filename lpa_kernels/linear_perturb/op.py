"""Public ``linear_perturb``: validation, dispatch and the custom ops of the fused GEMM.

The fast backends run two custom ops on flattened, contiguous tensors (``x (M, in)`` with
``M = B * rows_per_label``):

- ``lpa_kernels::linear_perturb`` -> ``(out, preact)``: the GEMM with the fused bias, activation and
  class-perturbation epilogue. ``preact = x @ weight.T + bias`` is written only when a backward will need
  it (an activation other than ``none``, or ``scale`` mode, and a gradient is wanted); otherwise it is an
  empty tensor. It is the only activation-sized tensor saved, where the eager chain saves one or two.
- ``lpa_kernels::linear_perturb_backward`` -> ``(grad_preact, grad_bias, grad_delta)``: one pass over
  ``grad_out``. ``grad_x = grad_preact @ weight`` and ``grad_weight = grad_preact.T @ x`` are then plain
  ``torch.matmul`` calls (cuBLAS on a GPU), the same for both backends.

The launchers (``linear_perturb_forward``, ``linear_perturb_backward_epilogue``) provide
``backends.LinearPerturbLaunchers`` (``triton_kernels.py``, ``cuda_kernels.py``).

Autocast: under ``torch.autocast`` x, weight and bias are cast to the autocast dtype in
``linear_perturb`` itself, as ``F.linear`` casts them, and the result has that dtype. This is done in
Python rather than with ``torch.library.register_autocast``, which casts to one dtype fixed when it is
registered instead of the dtype of the autocast region in effect.
"""

from __future__ import annotations

from typing import Optional

import torch

from lpa_kernels import _checks, backend as _backend
from lpa_kernels._common import compute_dtype, under_transform
from lpa_kernels.linear_perturb import naive
from lpa_kernels.linear_perturb.backends import launchers

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _needs_preact(activation: str, mode: str) -> bool:
    """Whether the backward reads the pre-activation: for act'(z), and for act(z) in scale mode."""
    return activation != "none" or mode == "scale"


@torch.library.custom_op("lpa_kernels::linear_perturb", mutates_args=())
def _linear_perturb_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    delta: torch.Tensor,
    rows_per_label: int,
    activation: str,
    mode: str,
    save_preact: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (M, N), preact (M, N) or empty)`` in ``x.dtype``, for ``x (M, in)``, ``weight (N, in)``."""
    return launchers(backend).linear_perturb_forward(x, weight, bias, labels, rows_per_label, delta, activation, mode, save_preact)


@_linear_perturb_op.register_fake
def _(x, weight, bias, labels, delta, rows_per_label, activation, mode, save_preact, backend):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, (torch.empty_like(out) if save_preact else x.new_empty(0))


@torch.library.custom_op("lpa_kernels::linear_perturb_backward", mutates_args=())
def _linear_perturb_backward_op(
    grad_out: torch.Tensor,
    preact: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    rows_per_label: int,
    activation: str,
    mode: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_preact (M, N) in grad_out.dtype, grad_bias (N,), grad_delta (K, N))``, the last two in
    float32 (float64 for float64 ``grad_out``)."""
    return launchers(backend).linear_perturb_backward_epilogue(grad_out, preact, labels, rows_per_label, delta, activation, mode)


@_linear_perturb_backward_op.register_fake
def _(grad_out, preact, labels, delta, rows_per_label, activation, mode, backend):
    acc_dtype = compute_dtype(grad_out.dtype)
    n = grad_out.shape[1]
    grad_bias, grad_delta = grad_out.new_empty((n,), dtype=acc_dtype), grad_out.new_empty((delta.shape[0], n), dtype=acc_dtype)
    return torch.empty_like(grad_out), grad_bias, grad_delta


def _setup_context(ctx, inputs, output):
    x, weight, bias, labels, delta, rows_per_label, activation, mode, save_preact, backend = inputs
    need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # grad_x reads weight and grad_weight reads x: keep each only when the other gradient is wanted.
    ctx.save_for_backward(x if need_weight else None, weight if need_x else None, labels, delta, output[1])
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.rows_per_label, ctx.activation, ctx.mode, ctx.backend = rows_per_label, activation, mode, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_preact):
    x, weight, labels, delta, preact = ctx.saved_tensors
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_out, x, weight, delta)):
        # create_graph: the result would miss act''(z) (preact is not differentiable), silently wrong
        raise RuntimeError("linear_perturb's fast backward (backend triton or cuda) is not differentiable: "
                           "for double backward (create_graph=True) use backend='reference'")
    if _needs_preact(ctx.activation, ctx.mode) and preact.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError("lpa_kernels::linear_perturb ran with save_preact=False; its backward needs the pre-activation")
    grad_preact, grad_bias, grad_delta = _linear_perturb_backward_op(
        grad_out.contiguous(), preact, labels, delta, ctx.rows_per_label, ctx.activation, ctx.mode, ctx.backend
    )
    need = ctx.needs_input_grad
    grad_x = torch.matmul(grad_preact, weight) if need[0] else None
    grad_weight = torch.matmul(grad_preact.t(), x) if need[1] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if need[2] else None
    grad_delta = grad_delta.to(delta.dtype) if need[4] else None
    return grad_x, grad_weight, grad_bias, None, grad_delta, None, None, None, None, None


_linear_perturb_op.register_autograd(_backward, setup_context=_setup_context)


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


def _autocast(x, weight, bias):
    """``(x, weight, bias)`` cast as ``F.linear`` casts them inside an autocast region on x's device."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t  # noqa: E731
    return cast(x), cast(weight), cast(bias)


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
    ``delta (K, out)``; returns ``(B, out)`` or ``(B, T, out)`` in ``x.dtype`` (the autocast dtype inside
    an autocast region). ``activation`` is one of ``none``, ``relu``, ``gelu``, ``gelu_tanh``, ``silu``.
    Differentiable in x, weight, bias and delta. With mixed x/weight dtypes the GEMM runs in their
    promoted dtype. ``delta`` may have another float dtype than x: its gradient, accumulated in float32
    (float64 for float64 x), comes back in delta's dtype (the rule in ``lpa_kernels._checks``).
    """
    backend = _check_linear_perturb_args(x, weight, bias, labels, delta, activation, mode, backend)
    x, weight, bias = _autocast(x, weight, bias)
    if backend == "reference" or under_transform() or x.shape[-1] == 0:  # in_features 0: no GEMM to fuse
        return naive.linear_perturb(x, weight, bias, labels, delta, activation, mode)
    gemm_dtype = torch.promote_types(x.dtype, weight.dtype)
    rows_per_label = x.shape[1] if x.dim() == 3 else 1
    x2d = x.reshape(-1, x.shape[-1]).to(gemm_dtype).contiguous()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, delta))
    out, _ = _linear_perturb_op(
        x2d, weight.to(gemm_dtype).contiguous(), None if bias is None else bias.contiguous(), labels.contiguous(),
        delta.contiguous(), rows_per_label, activation, mode, wants_grad and _needs_preact(activation, mode), backend,
    )
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
