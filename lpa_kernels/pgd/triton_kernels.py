"""Triton kernels for ``pgd_step_`` and the fused ``class_grad_pgd_step_``.

One program per class c updates ``delta[c] (D,)`` in place, looping over D in blocks:
1. statistics of the class gradient ``g_c``: whether any entry is non-zero (a class with an all-zero
   gradient keeps its delta, projection included) and its largest ``|entry|``;
2. ``linf``: write ``clamp(delta + step * dir * sign(g), -eps, eps)``;
   ``l2``: compute ``||g / largest||`` (no overflow; a row with Inf entries uses their sign pattern, see
   ``naive.py``), ``new = delta + step * dir * g / (||g|| + 1e-12)`` and ``||new||``, then write
   ``new`` scaled back onto the ball of radius ``eps - eps * l2_radius_margin`` when outside it.
The fused kernel runs one program per segment of the class-sorted batch (``class_segments``: at most
``min(B, K)``, one per class present), reduces ``g_c`` from ``grad_out`` (the same segmented reduction
as ``perturb``'s backward) into a float32 (float64) scratch row, then runs the same update. Classes
absent from the batch have a zero gradient, so they keep their delta: no program touches them.
NaN propagates as in the reference: a NaN gradient counts as non-zero, and no min/max drops it.
Known limit: one program per class present, so few classes with large D use few of a GPU's cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import l2_radius_margin
from lpa_kernels._triton_common import (
    accumulator, accumulator_dtype, class_block_sum, class_segments, kernel_dtype_view, reduction_blocks, segment_span,
)

# Block of D one update pass handles at a time (one class row per program).
BLOCK_UPDATE = 1024


@triton.jit
def _gradient_stats(grad_ptr, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``(any entry of grad[:D] is non-zero, largest |entry|)``."""
    largest = tl.zeros((BLOCK,), dtype=ACC)
    nonzero = tl.zeros((BLOCK,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + d, mask=d < D, other=0).to(ACC)
        largest = tl.maximum(largest, tl.abs(g))
        nonzero = tl.maximum(nonzero, (g != 0).to(tl.int32))
    return tl.max(nonzero, axis=0) > 0, tl.max(largest, axis=0)


@triton.jit
def _signum(x):
    """sign(x), but NaN stays NaN (``torch.sign`` gives 0 there, which would hide a NaN gradient)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


@triton.jit
def _not_finite(x):
    """Inf or NaN (``x - x`` is 0 exactly for finite x)."""
    return (x - x) != 0


@triton.jit
def _scaled(g, largest, infinite):
    """An entry of the L2 direction before normalisation (``naive.l2_unit``): ``g / largest``, or in a row
    holding Inf (``infinite``) the sign of its Inf entries, finite entries 0 (``g * 0`` keeps NaN)."""
    is_inf = _not_finite(g) & (g == g)
    return tl.where(infinite, tl.where(is_inf, _signum(g), g * 0), g / largest)


@triton.jit
def _update_class(
    delta_ptr, grad_ptr, c, D, step_ptr, eps_ptr, direction_ptr, active, largest, radius_margin,
    L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Write the PGD update of ``delta[c]`` (row pointers ``delta_ptr``, ``grad_ptr``) when ``active``."""
    step = tl.load(step_ptr + c).to(ACC) * tl.load(direction_ptr + c).to(ACC)
    eps = tl.load(eps_ptr + c).to(ACC)
    if L2:
        infinite = _not_finite(largest)  # Inf (or NaN, which then reaches every entry through the norm)
        largest = tl.where(largest > 0, largest, 1.0)  # an all-zero row writes nothing: avoid 0 / 0
        scaled_sumsq = tl.zeros((BLOCK,), dtype=ACC)
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            s = _scaled(tl.load(grad_ptr + d, mask=d < D, other=0).to(ACC), largest, infinite)
            scaled_sumsq += tl.where(d < D, s * s, 0)
        tiny = tl.where(infinite, 0.0, 1e-12 / largest)
        step = step / (tl.sqrt(tl.sum(scaled_sumsq, axis=0)) + tiny)
        new_sumsq = tl.zeros((BLOCK,), dtype=ACC)
        for d0 in range(0, D, BLOCK):
            d = d0 + tl.arange(0, BLOCK)
            g = _scaled(tl.load(grad_ptr + d, mask=d < D, other=0).to(ACC), largest, infinite)
            new = tl.load(delta_ptr + d, mask=d < D, other=0).to(ACC) + step * g
            new_sumsq += tl.where(d < D, new * new, 0)
        length = tl.sqrt(tl.sum(new_sumsq, axis=0))
        radius = eps - eps * radius_margin
    # An inactive class writes nothing: its delta stays exactly as it was.
    written = tl.where(active, D, 0)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        mask = d < written
        old = tl.load(delta_ptr + d, mask=mask, other=0).to(ACC)
        g = tl.load(grad_ptr + d, mask=mask, other=0).to(ACC)
        if L2:
            new = old + step * _scaled(g, largest, infinite)
            new = new * (radius / tl.maximum(length, radius))  # 1 inside the ball; no 0 / 0 for a zero row
        else:
            new = old + step * _signum(g)
            new = tl.where(new > eps, eps, tl.where(new < -eps, -eps, new))
        tl.store(delta_ptr + d, new.to(delta_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_kernel(
    delta_ptr, grad_ptr, step_ptr, eps_ptr, direction_ptr, D, radius_margin,
    L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    row = c.to(tl.int64) * D
    active, largest = _gradient_stats(grad_ptr + row, D, ACC, BLOCK)
    _update_class(delta_ptr + row, grad_ptr + row, c, D, step_ptr, eps_ptr, direction_ptr, active, largest,
                  radius_margin, L2, ACC, BLOCK)


@triton.jit
def _class_grad_pgd_step_kernel(
    delta_ptr, grad_out_ptr, h_ptr, scratch_ptr, order_ptr, segment_class_ptr, segment_start_ptr,
    step_ptr, eps_ptr, direction_ptr, K, F, D, inner, R, radius_margin,
    SCALE: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # Program s updates the class c of segment s, reducing into scratch row s. A padding segment
    # (c == K) has no rows, hence a zero gradient, so _update_class writes nothing; clamping c keeps
    # its reads of delta, step, eps and direction in bounds.
    s = tl.program_id(0)
    c, start, rows = segment_span(segment_class_ptr, segment_start_ptr, s, R)
    c = tl.minimum(c, K - 1)
    row, scratch_row = c.to(tl.int64) * D, s.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        g = class_block_sum(
            grad_out_ptr, h_ptr, delta_ptr, grad_out_ptr, order_ptr, c, start, 0, rows, d0, F, D, inner, R,
            SCALE, False, ACC, BLOCK_D, BLOCK_Q,
        )
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(scratch_ptr + scratch_row + d, g, mask=d < D)
    # The scratch row is read back by other threads of this program than those that wrote it.
    tl.debug_barrier()
    active, largest = _gradient_stats(scratch_ptr + scratch_row, D, ACC, BLOCK_D)
    _update_class(delta_ptr + row, scratch_ptr + scratch_row, c, D, step_ptr, eps_ptr, direction_ptr, active, largest,
                  radius_margin, L2, ACC, BLOCK_D)


def _in_kernel_dtype(delta: torch.Tensor, launch) -> None:
    """Run ``launch(kernel_delta)`` on ``delta`` itself, or on a float32 copy written back (bfloat16
    under the CPU interpreter)."""
    kdelta = kernel_dtype_view(delta)
    launch(kdelta)
    if kdelta is not delta:
        delta.copy_(kdelta)


def pgd_step(delta, grad, step, eps, direction, norm):
    """``PGDLaunchers.pgd_step``."""
    K, D = delta.shape
    if delta.numel() == 0:
        return
    kgrad = kernel_dtype_view(grad.contiguous())
    block = min(triton.next_power_of_2(D), BLOCK_UPDATE)
    _in_kernel_dtype(delta, lambda kdelta: _pgd_step_kernel[(K,)](
        kdelta, kgrad, step, eps, direction, D, l2_radius_margin(accumulator_dtype(delta, grad)),
        L2=norm == "l2", ACC=accumulator(delta, grad), BLOCK=block,
    ))


def class_grad_pgd_step(delta, grad_out, labels, h, step, eps, direction, inner, mode, norm):
    """``PGDLaunchers.class_grad_pgd_step``."""
    K, D = delta.shape
    B, F = grad_out.shape
    if delta.numel() == 0 or B == 0:  # an empty batch leaves every class's delta as it is
        return
    kgrad_out, kh = kernel_dtype_view(grad_out), kernel_dtype_view(h)
    order, segment_class, segment_start = class_segments(labels, K)
    segments = segment_class.numel()
    scratch = torch.empty((segments, D), dtype=accumulator_dtype(delta, grad_out, h), device=delta.device)
    R = F // D
    block_d, block_q = reduction_blocks(D, inner, B * R)
    _in_kernel_dtype(delta, lambda kdelta: _class_grad_pgd_step_kernel[(segments,)](
        kdelta, kgrad_out, kgrad_out if kh is None else kh, scratch, order, segment_class, segment_start,
        step, eps, direction, K, F, D, inner, R, l2_radius_margin(accumulator_dtype(delta, grad_out, h)), SCALE=mode == "scale", L2=norm == "l2", ACC=accumulator(delta, grad_out, h), BLOCK_D=block_d, BLOCK_Q=block_q,
    ))
