"""Public ``pgd_step_`` and ``class_grad_pgd_step_``: validation, dispatch and the custom ops.

The launchers provide ``backends.PGDLaunchers`` (``triton_kernels.py``, ``cuda_kernels.py``); they update
a contiguous ``delta (K, D)`` in place.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lpa_kernels import _checks, _host_ext, backend as _backend
from lpa_kernels._common import delta_layout, flat, update_in_place
from lpa_kernels.perturb.op import class_grad
from lpa_kernels.perturb import naive as perturb_naive
from lpa_kernels.pgd import naive
from lpa_kernels.pgd.backends import launchers
from lpa_kernels.step_update.plan import call_plan


@torch.library.custom_op("lpa_kernels::pgd_step_", mutates_args=("delta", "skipped"))
def _pgd_step_op(
    delta: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor,
    norm: str, backend: str, ok: Optional[torch.Tensor] = None, skipped: Optional[torch.Tensor] = None,
) -> None:
    # With ``ok`` and ``skipped``: the training step's guarded step (``naive.guarded_pgd_step_``).
    if backend == "reference":  # under torch.compile (run_pgd_step_)
        _naive_pgd_step_(delta, grad, step_size, eps, direction, norm, ok, skipped)
    else:
        launchers(backend).pgd_step(flat(delta), flat(grad), step_size, eps, direction, norm, ok, skipped)


@_pgd_step_op.register_fake
def _(delta, grad, step_size, eps, direction, norm, backend, ok=None, skipped=None):
    return None


@torch.library.custom_op("lpa_kernels::class_grad_pgd_step_", mutates_args=("delta",))
def _class_grad_pgd_step_op(
    delta: torch.Tensor, grad_out: torch.Tensor, labels: torch.Tensor, h: Optional[torch.Tensor],
    step_size: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor, inner: int, perturb_mode: str,
    norm: str, backend: str,
) -> None:
    # (An argument named ``mode`` would clash with torch's functionalization of mutating ops.) The labels'
    # plan in one launch where it can be (step_update.plan.call_plan), instead of the launcher's sort.
    plan = call_plan(labels, delta.shape[0], backend) if delta.numel() else None
    launchers(backend).class_grad_pgd_step(flat(delta), flat(grad_out), labels, flat(h), step_size, eps, direction,
                                           inner, perturb_mode, norm, plan)


@_class_grad_pgd_step_op.register_fake
def _(delta, grad_out, labels, h, step_size, eps, direction, inner, perturb_mode, norm, backend):
    return None


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
    a radius a few ulps of delta's dtype below ``eps_c`` (``_common.l2_radius_margin``), absorbing the rounding
    of the norm and into delta (a float32 delta stepped in float64 included);
    half-precision deltas may exceed it by their own rounding. The reference backend sums that norm in
    float64; the Triton and CUDA kernels in the compute dtype, so there a float32 row with entries beyond
    ~1e19 overflows it and is projected to zero (Inf entries of delta give the definition's NaN).

    In place: ``delta`` must not share memory with ``grad`` or a hyperparameter tensor, nor require
    grad in grad mode (call under ``torch.no_grad()``); both raise ``ValueError``.
    """
    step, radius, sign = _checks.check_pgd_hyperparameters(delta, step_size, eps, direction, norm)
    _checks.check_float("grad", grad)
    if grad.shape != delta.shape:
        raise ValueError(f"grad must have the shape of delta {tuple(delta.shape)}, got {tuple(grad.shape)}")
    device = _checks.check_same_device(delta=delta, grad=grad)
    _checks.check_in_place_target(delta, grad=grad, step_size=step_size, eps=eps, direction=direction)
    return run_pgd_step_(delta, grad, step, radius, sign, norm, _backend.resolve(backend, device))


def run_pgd_step_(delta, grad, step, radius, sign, norm: str, backend: str, ok: torch.Tensor | None = None,
                  skipped: torch.Tensor | None = None) -> torch.Tensor:
    """``pgd_step_`` without validation (no device sync), for the LPA training machinery (the ``run_*`` entry
    style, as ``perturb.op.run_perturb``), whose arguments are valid by construction: ``grad`` of ``delta``'s
    shape and device; ``step``, ``radius`` (> 0) and ``sign`` ``(K,)`` tensors as ``_common.per_class``
    makes them; ``backend`` resolved. With ``ok`` and ``skipped``, the guarded step (``run_guarded_pgd_step_``).
    The reference backend runs the host C++ kernel on CPU float32/float64 tensors when it is built."""
    if backend == "reference" and not torch.compiler.is_compiling():
        if delta.device.type == "cpu" and _host_ext.pgd_step(delta, grad, step, radius, sign, norm, ok, skipped):
            return delta
        return _naive_pgd_step_(delta, grad, step, radius, sign, norm, ok, skipped)
    # Under torch.compile the reference backend's step is the custom op too, opaque to Inductor: inlined, two
    # L2 steps on one delta in a graph crashed Inductor's CPU code generation (KeyError 'bufN', PyTorch
    # issues 188228 and 196570: a mutated buffer promoted to a local one in outer-loop fusion).
    grad = grad.detach().contiguous()
    return update_in_place(delta, lambda d: _pgd_step_op(d, grad, step, radius, sign, norm, backend, ok, skipped))


def _naive_pgd_step_(delta, grad, step, radius, sign, norm: str, ok: torch.Tensor | None,
                     skipped: torch.Tensor | None) -> torch.Tensor:
    """The definition's step, guarded when ``ok`` is given."""
    if ok is None:
        return naive.pgd_step_(delta, grad, step, radius, sign, norm)
    return naive.guarded_pgd_step_(delta, grad, step, radius, sign, norm, ok, skipped)


def run_guarded_pgd_step_(delta, grad, step, radius, sign, norm: str, ok: torch.Tensor, skipped: torch.Tensor,
                          backend: str) -> torch.Tensor:
    """The training step's PGD update (``naive.guarded_pgd_step_``: a class with a non-finite gradient,
    or every class when ``ok`` is False, keeps its delta; ``skipped`` counts the former, in place),
    without validation, like ``run_pgd_step_``. On the Triton backend one launch, or two on the split
    grid (few classes with long rows, ``split.split_block``)."""
    return run_pgd_step_(delta, grad, step, radius, sign, norm, backend, ok, skipped)


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
    step, radius, sign = _checks.check_pgd_hyperparameters(delta, step_size, eps, direction, norm)
    _checks.check_grad_out(grad_out, h, mode, delta.shape)
    device = _checks.check_same_device(delta=delta, grad_out=grad_out, labels=labels, h=h)
    _checks.check_labels(labels, grad_out.shape[0], delta.shape[0])
    _checks.check_in_place_target(delta, grad_out=grad_out, labels=labels, h=h, step_size=step_size, eps=eps,
                                  direction=direction)
    backend = _backend.resolve(backend, device)
    h = h if mode == "scale" else None
    if backend == "reference" or not math.prod(grad_out.shape[1:]):  # no features: every class keeps its delta
        # naive.class_grad_pgd_step_ with the step as run_pgd_step_ makes it (an opaque op under torch.compile)
        grad = perturb_naive.class_grad(grad_out, labels, delta.shape[0], delta.shape, h=h, mode=mode)
        return run_pgd_step_(delta, grad, step, radius, sign, norm, "reference")
    layout = delta_layout(grad_out.shape[1:], delta.shape)
    if layout is None:  # a layout the fused kernel does not serve: reduce, then step (two launches)
        grad = class_grad(grad_out, labels, delta.shape[0], delta.shape, h=h, mode=mode, backend=backend)
        return run_pgd_step_(delta, grad, step, radius, sign, norm, backend)
    args = (grad_out.detach().contiguous(), labels.contiguous(), None if h is None else h.detach().contiguous())
    return update_in_place(
        delta, lambda d: _class_grad_pgd_step_op(d, *args, step, radius, sign, layout[1], mode, norm, backend)
    )
