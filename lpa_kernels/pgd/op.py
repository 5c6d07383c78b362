"""Public ``pgd_step_`` and ``class_grad_pgd_step_``: validation, dispatch and the custom ops.

Launchers (``pgd_step``, ``class_grad_pgd_step``) live in ``triton_kernels.py`` and in
``lpa_kernels.cuda_kernels``; they update a contiguous ``delta (K, D)`` in place.
"""

from __future__ import annotations

from typing import Optional

import torch

from lpa_kernels import _checks, backend as _backend
from lpa_kernels._common import delta_layout, per_class
from lpa_kernels.perturb.op import _flat, class_grad
from lpa_kernels.pgd import naive

_TRITON = "lpa_kernels.pgd.triton_kernels"


@torch.library.custom_op("lpa_kernels::pgd_step_", mutates_args=("delta",))
def _pgd_step_op(
    delta: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor, eps: torch.Tensor,
    direction: torch.Tensor, norm: str, backend: str,
) -> None:
    launch = _backend.kernels(backend, _TRITON).pgd_step
    launch(_flat(delta), _flat(grad), step_size, eps, direction, norm)


@_pgd_step_op.register_fake
def _(delta, grad, step_size, eps, direction, norm, backend):
    return None


@torch.library.custom_op("lpa_kernels::class_grad_pgd_step_", mutates_args=("delta",))
def _class_grad_pgd_step_op(
    delta: torch.Tensor, grad_out: torch.Tensor, labels: torch.Tensor, h: Optional[torch.Tensor],
    step_size: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor, inner: int, perturb_mode: str,
    norm: str, backend: str,
) -> None:
    # (An argument named ``mode`` would clash with torch's functionalization of mutating ops.)
    launch = _backend.kernels(backend, _TRITON).class_grad_pgd_step
    launch(_flat(delta), _flat(grad_out), labels, _flat(h), step_size, eps, direction, inner, perturb_mode, norm)


@_class_grad_pgd_step_op.register_fake
def _(delta, grad_out, labels, h, step_size, eps, direction, inner, perturb_mode, norm, backend):
    return None


# ``direction`` is a per-class multiplier of the step: the sign chooses ascent (+) or descent (-) of the
# class's loss, the magnitude scales the step (the confidence policy's |thr - p_c| / max), never beyond it.
DIRECTION_BOUNDS = (-1.0, 1.0)


def _check_pgd_args(delta, step_size, eps, direction, norm):
    """Validate delta and the hyperparameters (finite; step_size >= 0, eps > 0, direction in [-1, 1];
    tensors on delta's device); returns them as ``(K,)`` tensors in delta's compute dtype."""
    _checks.check_float("delta", delta)
    if delta.dim() < 1 or delta.shape[0] < 1:
        raise ValueError(f"delta must have shape (K, *P) with K >= 1, got {tuple(delta.shape)}")
    _checks.check_choice("norm", norm, _checks.NORMS)
    k, device = delta.shape[0], delta.device
    _checks.check_per_class("step_size", step_size, k, positive=False, nonnegative=True, device=device)
    _checks.check_per_class("eps", eps, k, positive=True, device=device)
    _checks.check_per_class("direction", direction, k, positive=False, bounds=DIRECTION_BOUNDS, device=device)
    return [per_class(v, k, delta) for v in (step_size, eps, direction)]


def _update_in_place(delta: torch.Tensor, run) -> torch.Tensor:
    """Run ``run(contiguous_delta)`` and make sure ``delta`` itself holds the result."""
    with torch.no_grad():
        target = delta if delta.is_contiguous() else delta.contiguous()
        run(target)
        if target is not delta:
            delta.copy_(target)
    return delta


def pgd_step_(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    direction: float | torch.Tensor = 1.0,
    norm: str = "linf",
    backend: str = "auto",
) -> torch.Tensor:
    """One projected step on ``delta (K, *P)`` in place, from the class gradient ``grad (K, *P)``.

    ``linf``: ``clamp(delta + step * dir * sign(grad), -eps, eps)``; ``l2``: ``delta + step * dir *
    grad / (||grad|| + 1e-12)`` scaled back onto ``||delta_c|| <= eps_c``. A class with an all-zero
    gradient keeps its delta. Returns ``delta``.

    Hyperparameters: ``step_size`` (>= 0), ``eps`` (> 0) and ``direction`` are floats or ``(K,)`` tensors
    on delta's device, all finite. ``direction`` multiplies the step: +1 ascends the class's loss, -1
    descends it, values in between shorten the step; it must lie in [-1, 1].

    Dtypes: ``grad`` may have any float dtype; the step is computed in float64 when delta or grad is
    float64, else in float32, and rounded into delta's dtype.

    Non-finite gradients: NaN propagates into the class's delta (as everywhere in the library). For
    ``l2``, a row holding +-Inf entries steps along the sign pattern of its Inf entries, normalised
    (the limit of ``g / ||g||`` as those entries grow; its finite entries count as 0), so the result is
    finite. Rows are scaled by their largest entry before the norm, so huge finite gradients do not
    overflow it. The projection never leaves a float32/float64 class above eps: rows are projected onto
    a radius a few ulps below ``eps_c`` (``_common.l2_radius_margin``), absorbing the rounding of the norm;
    half-precision deltas may exceed it by their own rounding.

    In place: ``delta`` must not share memory with ``grad`` or a hyperparameter tensor, nor require
    grad in grad mode (call under ``torch.no_grad()``); both raise ``ValueError``.
    """
    step, radius, sign = _check_pgd_args(delta, step_size, eps, direction, norm)
    _checks.check_float("grad", grad)
    if grad.shape != delta.shape:
        raise ValueError(f"grad must have the shape of delta {tuple(delta.shape)}, got {tuple(grad.shape)}")
    device = _checks.check_same_device(delta=delta, grad=grad)
    _checks.check_in_place_target(delta, grad=grad, step_size=step_size, eps=eps, direction=direction)
    return run_pgd_step_(delta, grad, step, radius, sign, norm, _backend.resolve(backend, device))


def run_pgd_step_(delta, grad, step, radius, sign, norm: str, backend: str) -> torch.Tensor:
    """``pgd_step_`` without validation (no device sync), for callers whose arguments are valid by
    construction (the LPA training machinery): ``grad`` of ``delta``'s shape and device; ``step``,
    ``radius`` (> 0) and ``sign`` ``(K,)`` tensors as ``_common.per_class`` makes them; ``backend`` resolved."""
    if backend == "reference":
        return naive.pgd_step_(delta, grad, step, radius, sign, norm)
    grad = grad.detach().contiguous()
    return _update_in_place(delta, lambda d: _pgd_step_op(d, grad, step, radius, sign, norm, backend))


def class_grad_pgd_step_(
    delta: torch.Tensor,
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    direction: float | torch.Tensor = 1.0,
    norm: str = "linf",
    h: torch.Tensor | None = None,
    mode: str = "add",
    backend: str = "auto",
) -> torch.Tensor:
    """``pgd_step_(delta, class_grad(grad_out, labels, ...), ...)`` in one launch (single-pass LPA).

    ``grad_out (B, *F)`` is the gradient w.r.t. the perturbed activations; ``h (B, *F)`` is needed for
    ``mode="scale"``. Returns ``delta``, updated in place. Validation, dtypes, non-finite gradients and
    the in-place rules are ``pgd_step_``'s (``grad_out``, ``h`` and ``labels`` may not overlap delta).
    """
    step, radius, sign = _check_pgd_args(delta, step_size, eps, direction, norm)
    _checks.check_grad_out(grad_out, h, mode, delta.shape)
    device = _checks.check_same_device(delta=delta, grad_out=grad_out, labels=labels, h=h)
    _checks.check_labels(labels, grad_out.shape[0], delta.shape[0])
    _checks.check_in_place_target(delta, grad_out=grad_out, labels=labels, h=h, step_size=step_size, eps=eps,
                                  direction=direction)
    backend = _backend.resolve(backend, device)
    h = h if mode == "scale" else None
    if backend == "reference":
        return naive.class_grad_pgd_step_(delta, grad_out, labels, step, radius, sign, norm, h=h, mode=mode)
    layout = delta_layout(grad_out.shape[1:], delta.shape)
    if layout is None:  # a layout the fused kernel does not serve: reduce, then step (two launches)
        grad = class_grad(grad_out, labels, delta.shape[0], delta.shape, h=h, mode=mode, backend=backend)
        return run_pgd_step_(delta, grad, step, radius, sign, norm, backend)
    args = (grad_out.detach().contiguous(), labels.contiguous(), None if h is None else h.detach().contiguous())
    return _update_in_place(
        delta, lambda d: _class_grad_pgd_step_op(d, *args, step, radius, sign, layout[1], mode, norm, backend)
    )
