"""Public ``perturb`` and ``class_grad``: validation, dispatch and the torch.library custom ops.

The fast backends see flattened, contiguous tensors: ``h (B, F)``, ``delta (K, D)`` and the stride
``inner`` such that feature ``f`` reads ``delta[y, (f // inner) % D]`` (see ``_common.delta_layout``).
Their launchers provide ``backends.PerturbLaunchers`` (``triton_kernels.py``, ``cuda_kernels.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from lpa_kernels import _checks, _host_ext, backend as _backend
from lpa_kernels._common import compute_dtype, delta_layout, flat, padded_delta_shape, under_transform
from lpa_kernels.perturb import naive
from lpa_kernels.perturb.backends import launchers
from lpa_kernels.step_update.plan import call_plan


@torch.library.custom_op("lpa_kernels::perturb", mutates_args=())
def _perturb_op(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, inner: int, mode: str, backend: str,
                plan: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``plan``: the labels' ``_common.label_plan``, kept for the backward's class reduction (or None)."""
    out = launchers(backend).perturb_forward(flat(h), labels, flat(delta), inner, mode)
    return out.view(h.shape)


@_perturb_op.register_fake
def _(h, labels, delta, inner, mode, backend, plan=None):
    return torch.empty_like(h)


@torch.library.custom_op("lpa_kernels::perturb_backward", mutates_args=())
def _perturb_backward_op(
    grad_out: torch.Tensor,
    h: Optional[torch.Tensor],
    labels: torch.Tensor,
    delta: Optional[torch.Tensor],
    delta_shape: Sequence[int],
    delta_dtype: torch.dtype,
    inner: int,
    mode: str,
    backend: str,
    need_grad_h: bool,
    plan: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_h (B, *F), grad_delta (K, *P))`` in one pass over ``grad_out``; ``grad_h`` is empty
    when ``need_grad_h`` is False (``class_grad``). Deterministic on every backend (fixed-order
    reductions), so it takes no ``deterministic`` flag. Without the training step's ``plan``, the labels'
    plan is built here in one launch where it can be (``step_update.plan.call_plan``)."""
    k, per_class = delta_shape[0], math.prod(delta_shape[1:])
    plan = call_plan(labels, k, backend) if plan is None and per_class else plan
    grad_h, grad_delta = launchers(backend).perturb_backward(
        flat(grad_out), flat(h), labels, flat(delta), k, per_class, inner, mode, need_grad_h, delta_dtype, plan
    )
    grad_h = grad_h.view(grad_out.shape) if need_grad_h else grad_out.new_empty(0)
    return grad_h, grad_delta.view(tuple(delta_shape))


@_perturb_backward_op.register_fake
def _(grad_out, h, labels, delta, delta_shape, delta_dtype, inner, mode, backend, need_grad_h, plan=None):
    grad_h = torch.empty_like(grad_out) if need_grad_h else grad_out.new_empty(0)
    return grad_h, grad_out.new_empty(tuple(delta_shape), dtype=delta_dtype)


def _setup_context(ctx, inputs, output):
    h, labels, delta, inner, mode, backend, plan = inputs
    # add mode's gradients read neither h nor delta (only delta's shape and dtype): an in-place update of
    # delta between the forward and the backward is then fine, as on the reference backend
    scale = mode == "scale"
    ctx.save_for_backward(h if scale else None, labels, delta if scale else None, plan)
    ctx.inner, ctx.mode, ctx.backend, ctx.delta_shape, ctx.delta_dtype = inner, mode, backend, delta.shape, delta.dtype


def _backward(ctx, grad_out):
    h, labels, delta, plan = ctx.saved_tensors
    need_grad_h, need_grad_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if torch.is_grad_enabled():  # create_graph=True: the definition's ops, which autograd can differentiate again
        return _recorded_backward(ctx, grad_out, h, labels, delta, need_grad_h, need_grad_delta)
    grad_out = grad_out.contiguous()
    # add: grad_h is grad_out itself, so no kernel copies it. scale: grad_h = grad_out * (1 + delta[y])
    # is perturb's own forward, which is all that runs when delta needs no gradient (the training step).
    grad_h = grad_out if need_grad_h and ctx.mode == "add" else None
    kernel_grad_h = need_grad_h and ctx.mode == "scale"
    grad_delta = None
    if need_grad_delta:
        kernel_h, grad_delta = _perturb_backward_op(
            grad_out, h, labels, delta, list(ctx.delta_shape), ctx.delta_dtype, ctx.inner, ctx.mode,
            ctx.backend, kernel_grad_h, plan,
        )
        grad_h = kernel_h if kernel_grad_h else grad_h
    elif kernel_grad_h:
        grad_h = _perturb_op(grad_out, labels, delta, ctx.inner, "scale", ctx.backend)
    return grad_h, None, grad_delta, None, None, None, None


def _recorded_backward(ctx, grad_out, h, labels, delta, need_grad_h, need_grad_delta):
    """``_backward`` in ``naive``'s differentiable ops (double backward); ``delta`` and ``h`` are the saved
    ones (scale mode), so the second-order terms through them are recorded too."""
    grad_h = grad_delta = None
    if need_grad_h:
        grad_h = grad_out if ctx.mode == "add" else naive.perturb(grad_out, labels, delta, "scale")
    if need_grad_delta:
        grad_delta = naive.class_grad(grad_out, labels, ctx.delta_shape[0], ctx.delta_shape, h=h, mode=ctx.mode,
                                      out_dtype=ctx.delta_dtype)
    return grad_h, None, grad_delta, None, None, None, None


_perturb_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_layout(feature_shape, delta: torch.Tensor):
    """``(delta, inner)`` for the kernels; a delta whose layout they do not serve is expanded to full."""
    layout = delta_layout(feature_shape, delta.shape)
    if layout is None:
        full = delta.reshape(padded_delta_shape(delta.shape, feature_shape)).expand(delta.shape[0], *feature_shape)
        return full, 1
    return delta, layout[1]


def _check_perturb_args(h, labels, delta, mode, backend, label_values: bool = True) -> str:
    _checks.check_float("h", h)
    _checks.check_float("delta", delta)
    _checks.check_choice("mode", mode, _checks.MODES)
    if h.dim() < 1:
        raise ValueError(f"h must have shape (B, *F), got a 0-d tensor")
    _checks.check_delta_shape(delta.shape, h.shape[1:])
    device = _checks.check_same_device(h=h, labels=labels, delta=delta)
    _checks.check_labels(labels, h.shape[0], delta.shape[0], values=label_values)
    return _backend.resolve(backend, device)


def perturb(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, mode: str = "add", backend: str = "auto") -> torch.Tensor:
    """The perturbed activations ``h~`` (``h.dtype``, shape of ``h``).

    ``h (B, *F)``, ``labels (B,)`` int32/int64 in ``[0, K)``, ``delta (K, *P)`` with ``P`` broadcastable to
    ``F``. ``mode="add"``: ``h + delta[y]``; ``mode="scale"``: ``h * (1 + delta[y])``. Differentiable in
    ``h`` and ``delta`` (the fast backends compute both gradients in one pass over ``grad_out``).
    ``delta`` may have another float dtype than ``h`` (the rule in ``lpa_kernels._checks``): the result
    and ``grad_h`` have h's dtype, ``grad_delta`` delta's.
    """
    return _dispatch_perturb(h, labels, delta, mode, _check_perturb_args(h, labels, delta, mode, backend))


def run_perturb(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, mode: str, backend: str,
                plan: torch.Tensor | None = None, delta_grad_scale: int = 1) -> torch.Tensor:
    """``perturb`` without its device-syncing check, for the LPA training machinery (the ``run_*`` entry
    style, as ``pgd.op.run_pgd_step_``): the caller has checked ``labels``' range itself (on the device,
    once per training step, clamping them into range); every host-side check still runs. ``plan``: the
    step's ``_common.label_plan`` of ``labels``, which the backward's class reduction then reuses.
    ``delta_grad_scale``: delta's gradient is multiplied by it (the single-pass site's batch size: the
    mean loss's class gradient becomes the summed loss's); the reference host kernel does it in its sum."""
    backend = _checked_signature(h, labels, delta, mode, backend)
    return _dispatch_perturb(h, labels, delta, mode, backend, plan, delta_grad_scale)


# run_perturb's signatures already checked -> the resolved backend. The training step repeats a few every
# step, and the metadata checks cost more than the perturbation itself on small CPU batches.
_checked_signatures: dict[tuple, str] = {}


def _checked_signature(h, labels, delta, mode, backend) -> str:
    """``_check_perturb_args`` without the label values, once per signature (dtypes, shapes, devices, mode,
    backend) of plain tensors; a signature is remembered only once it passed."""
    plain = type(h) is torch.Tensor and type(labels) is torch.Tensor and type(delta) is torch.Tensor
    if not plain or backend == "auto" or torch.compiler.is_compiling():  # "auto" may read LPA_BACKEND anew
        return _check_perturb_args(h, labels, delta, mode, backend, label_values=False)
    key = (h.shape, h.dtype, h.device, labels.shape, labels.dtype, labels.device, delta.shape, delta.dtype,
           delta.device, mode, backend)
    resolved = _checked_signatures.get(key)
    if resolved is None:
        resolved = _check_perturb_args(h, labels, delta, mode, backend, label_values=False)
        if len(_checked_signatures) >= 256:  # varying batch shapes: start over rather than grow
            _checked_signatures.clear()
        _checked_signatures[key] = resolved
    return resolved


# the training step asks for the same few layouts every step; hashing two torch.Size is cheaper than the rule
_cached_layout = functools.lru_cache(maxsize=64)(delta_layout)


class _ScaledGrad(torch.autograd.Function):
    """The identity on delta whose backward multiplies the gradient by ``scale``. The ``forward(ctx, ...)``
    form: ``apply`` costs ~4 us where the ``setup_context`` form costs ~17 (torch 2.13, CPU)."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, scale: int) -> torch.Tensor:
        ctx.scale = scale
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _HostPerturb(torch.autograd.Function):
    """``perturb`` on the reference backend's host C++ kernels, ``delta (K, *P)`` read on the layout
    ``inner`` (``_host_ext.perturb``), delta's gradient times ``grad_scale``.

    An ``autograd.Function`` in the ``forward(ctx, ...)`` form (~4 us per call) rather than a
    ``custom_op`` with ``register_autograd`` (~19 us): the reference backend runs it only outside
    ``torch.compile`` (which sees ``naive.perturb``), so it needs no fake kernel. The backward runs the
    kernels where they serve its tensors, else ``naive``'s ops, which it also runs when autograd records
    it (``create_graph=True``), so double backward works."""

    @staticmethod
    def forward(ctx, h, labels, delta, inner: int, mode: str, grad_scale: int):
        need_h, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        scale = mode == "scale"
        # add mode saves only the labels: its grad_h is grad_out and its class gradient reads no data
        ctx.save_for_backward(labels, h if scale and need_delta else None, delta if scale and need_h else None)
        ctx.inner, ctx.mode, ctx.grad_scale, ctx.delta_shape = inner, mode, grad_scale, delta.shape
        return _host_ext.perturb(h, labels, delta, inner, mode)

    @staticmethod
    def backward(ctx, grad_out):
        labels, h, delta = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # the forward checked the labels; h and delta (saved by scale mode only) must share grad_out's dtype
        host = not torch.is_grad_enabled() and _host_ext.serves_perturb(None, grad_out, h, delta)
        grad_h = grad_delta = None
        if ctx.needs_input_grad[0]:
            if ctx.mode == "add":
                grad_h = grad_out
            elif host:
                grad_h = _host_ext.perturb(grad_out, labels, delta, ctx.inner, "scale")
            else:
                grad_h = naive.perturb(grad_out, labels, delta, "scale")
        if ctx.needs_input_grad[2]:
            if host:
                grad_delta = _host_ext.perturb_class_grad(grad_out, h, labels, ctx.delta_shape, ctx.inner, ctx.mode,
                                                          ctx.grad_scale)
            else:
                grad_delta = naive.class_grad(grad_out, labels, ctx.delta_shape[0], ctx.delta_shape, h, ctx.mode,
                                              grad_out.dtype) * ctx.grad_scale
        return grad_h, None, grad_delta, None, None, None


def scaled_grad(t: torch.Tensor, scale: int) -> torch.Tensor:
    """``t`` (a view) whose gradient is multiplied by ``scale`` on its way back (``t`` itself when 1)."""
    return t if scale == 1 else _ScaledGrad.apply(t, scale)


def _host_perturb_serves(h, labels, delta) -> bool:
    """Whether the reference backend runs ``perturb`` on the host kernels: where they serve the tensors,
    except when only ``h`` needs a gradient (the training forward after T PGD steps): there ``naive``'s
    ops cost less, their autograd nodes being C++ where ``_HostPerturb``'s backward is Python."""
    if torch.is_grad_enabled() and h.requires_grad and not delta.requires_grad:
        return False
    return _host_ext.serves_perturb(labels, h, delta)


def _definition_only(t: torch.Tensor) -> bool:
    """Whether ``perturb`` / ``class_grad`` on activations (or their gradient) ``t (B, *F)`` run the
    definition whatever the backend: under a transform (``_common.under_transform``), and for samples
    without features, ``F`` holding a 0: nothing for a kernel to do (the fast launchers would divide by
    the empty feature size)."""
    return under_transform() or not math.prod(t.shape[1:])


def _dispatch_perturb(h, labels, delta, mode, backend: str, plan: torch.Tensor | None = None,
                      delta_grad_scale: int = 1) -> torch.Tensor:
    """``perturb`` on validated arguments, ``backend`` resolved (see ``_definition_only``)."""
    backend = "reference" if _definition_only(h) else backend
    host = backend == "reference" and _host_perturb_serves(h, labels, delta)
    # after serves, which refuses under torch.compile: Dynamo warns when it traces an lru_cache wrapper
    layout = host and _cached_layout(h.shape[1:], delta.shape)
    if layout:
        if delta.requires_grad and torch.is_grad_enabled():
            return _HostPerturb.apply(h, labels, delta, layout[1], mode, delta_grad_scale)
        return _host_ext.perturb(h, labels, delta, layout[1], mode)  # no gradient to record
    delta = scaled_grad(delta, delta_grad_scale)
    if backend == "reference":
        return naive.perturb(h, labels, delta, mode)
    kernel_delta, inner = _kernel_layout(h.shape[1:], delta)
    return _perturb_op(h.contiguous(), labels.contiguous(), kernel_delta.contiguous(), inner, mode, backend, plan)


def class_grad(
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    delta_shape: Sequence[int],
    h: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    mode: str = "add",
    backend: str = "auto",
) -> torch.Tensor:
    """The class-summed gradient with respect to delta, shape ``delta_shape = (K, *P)``.

    ``grad_out (B, *F)`` is the gradient w.r.t. ``h~``; ``scale`` mode needs ``h`` too. The result has
    ``delta.dtype`` when ``delta`` is given, else float32 (float64 for float64 input). Classes absent
    from the batch get zero. The fast backends reduce per class in a fixed order, so the result is the
    same from run to run (deterministic) whether or not ``torch.use_deterministic_algorithms`` is on.
    A result that autograd records (grad mode on, ``grad_out`` or ``h`` requiring grad) is computed by the
    definition (``naive.class_grad``) on every backend, so that it can be differentiated.
    """
    _checks.check_count("num_classes", num_classes, 1)
    delta_shape = _checks.check_shape("delta_shape", delta_shape)
    if not delta_shape or delta_shape[0] != num_classes:
        raise ValueError(f"delta_shape must start with num_classes={num_classes}, got {delta_shape}")
    _checks.check_grad_out(grad_out, h, mode, delta_shape, delta_name="delta_shape")
    if delta is not None:
        _checks.check_float("delta", delta)
        if tuple(delta.shape) != delta_shape:
            raise ValueError(f"delta must have shape delta_shape={delta_shape}, got {tuple(delta.shape)}")
    device = _checks.check_same_device(grad_out=grad_out, labels=labels, h=h, delta=delta)
    _checks.check_labels(labels, grad_out.shape[0], num_classes)
    backend = _backend.resolve(backend, device)
    backend = "reference" if _definition_only(grad_out) else backend
    out_dtype = delta.dtype if delta is not None else compute_dtype(grad_out.dtype)
    h = h if mode == "scale" else None
    layout = delta_layout(grad_out.shape[1:], delta_shape)
    # the host and Triton/CUDA kernels return a result outside autograd: one to differentiate is the definition's
    graph = torch.is_grad_enabled() and (grad_out.requires_grad or (h is not None and h.requires_grad))
    if backend == "reference" or graph:
        if (not graph and layout is not None and out_dtype == grad_out.dtype
                and _host_ext.serves_perturb(labels, grad_out, h)):
            return _host_ext.perturb_class_grad(grad_out, h, labels, delta_shape, layout[1], mode)
        return naive.class_grad(grad_out, labels, num_classes, delta_shape, h=h, mode=mode, out_dtype=out_dtype)
    if layout is None:  # reduce at full resolution, then sum over the broadcast dimensions
        full_shape = (num_classes,) + tuple(grad_out.shape[1:])
        full = class_grad(grad_out, labels, num_classes, full_shape, h=h, mode=mode, backend=backend)
        return naive.class_grad(full, torch.arange(num_classes, device=device), num_classes, delta_shape, out_dtype=out_dtype)
    _, grad_delta = _perturb_backward_op(
        grad_out.contiguous(), None if h is None else h.contiguous(), labels.contiguous(), None,
        list(delta_shape), out_dtype, layout[1], mode, backend, False,
    )
    return grad_delta
