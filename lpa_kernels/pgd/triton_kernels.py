"""Triton kernels for ``pgd_step_`` and the fused ``class_grad_pgd_step_``.

One program per class c updates ``delta[c] (D,)`` in place, looping over D in blocks:
1. statistics of the class gradient ``g_c``: whether any entry is non-zero (a class with an all-zero
   gradient keeps its delta, projection included) and its largest ``|entry|``;
2. ``linf``: write ``clamp(delta + step * dir * sign(g), -eps, eps)``;
   ``l2``: compute ``||g / largest||`` (no overflow; a row with Inf entries uses their sign pattern, see
   ``naive.py``), ``new = delta + step * dir * g / (||g|| + 1e-12)`` and ``||new||``, then write
   ``new`` scaled back onto the ball of radius ``eps - eps * l2_radius_margin`` when outside it.
The fused kernel reduces ``g_c`` from ``grad_out`` with ``perturb``'s backward reduction
(``chunked_class_sums``: programs over (row chunk, feature block), long classes cut into chunks, so
K = 10 or a long-tailed batch still fills the device) into a float32 (float64) scratch row per segment
of the class-sorted batch; the program that completes a segment's last feature block (an arrival
count per segment) then runs the same update on it, in the same launch. Classes absent from the batch
have a zero gradient, so they keep their delta: no program touches them.
NaN propagates as in the reference: a NaN gradient counts as non-zero, and no min/max drops it.
Known limit: ``pgd_step_`` runs one program per class (its L2 norm and projection need the whole row):
with few classes it uses few of a GPU's multiprocessors; its rows are small (K x D x 12 bytes), so a
launch per phase of a split update would cost more than it saves (see issue 13's report).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import l2_radius_margin
from lpa_kernels._triton_common import (
    accumulator, accumulator_dtype, arrive, chunk_plan, chunked_class_sums, class_segments, kernel_dtype_view,
    reduction_tiling,
)

# Block of D one update pass handles at a time (one class row per program).
BLOCK_UPDATE = 1024


@triton.jit
def _gradient_stats(grad_ptr, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``(any entry of grad[:D] is non-zero, largest |entry|, every entry is finite)``."""
    largest = tl.zeros((BLOCK,), dtype=ACC)
    nonzero = tl.zeros((BLOCK,), dtype=tl.int32)
    nonfinite = tl.zeros((BLOCK,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + d, mask=d < D, other=0).to(ACC)
        largest = tl.maximum(largest, tl.abs(g))
        nonzero = tl.maximum(nonzero, (g != 0).to(tl.int32))
        nonfinite = tl.maximum(nonfinite, _not_finite(g).to(tl.int32))
    return tl.max(nonzero, axis=0) > 0, tl.max(largest, axis=0), tl.max(nonfinite, axis=0) == 0


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
    delta_ptr, grad_ptr, step_ptr, eps_ptr, direction_ptr, ok_ptr, skipped_ptr, D, radius_margin,
    GUARD: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # GUARD (the training step's update, ``naive.guarded_pgd_step_``): a class whose gradient is not
    # finite, or every class when *ok_ptr is False, keeps its delta; non-finite classes of an ok batch
    # are counted into *skipped_ptr.
    c = tl.program_id(0)
    row = c.to(tl.int64) * D
    active, largest, finite = _gradient_stats(grad_ptr + row, D, ACC, BLOCK)
    if GUARD:
        ok = tl.load(ok_ptr) != 0
        active = active & finite & ok
        tl.atomic_add(skipped_ptr, (ok & (finite == 0)).to(tl.int64))
    _update_class(delta_ptr + row, grad_ptr + row, c, D, step_ptr, eps_ptr, direction_ptr, active, largest,
                  radius_margin, L2, ACC, BLOCK)


@triton.jit
def _class_grad_pgd_step_kernel(
    delta_ptr, grad_out_ptr, h_ptr, scratch_ptr, partial_ptr, arrivals_ptr, finished_ptr, order_ptr,
    segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr,
    step_ptr, eps_ptr, direction_ptr, K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB, radius_margin,
    SPLIT: tl.constexpr, SCALE: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, SLABS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_UPDATE: tl.constexpr,
):
    # Phase 1, over the whole (chunk, d-block) grid: the class sums of each segment s into scratch row
    # s (perturb's chunked reduction). Phase 2: the program completing the last d-block of segment s
    # (counted in finished[s]) runs the PGD update of its class c from that row. A padding segment has
    # no rows: nothing completes it, so no program touches its (clamped) class.
    s, c, completed = chunked_class_sums(
        grad_out_ptr, h_ptr, grad_out_ptr, grad_out_ptr, scratch_ptr, partial_ptr, arrivals_ptr, order_ptr,
        segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr, tl.program_id(0),
        K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB,
        SPLIT, True, SCALE, False, ACC, BLOCK_D, BLOCK_Q, SLABS, BLOCK_P,
    )
    if completed:
        finished = arrive(finished_ptr + s, completed)
        if finished == num_d_blocks - 1:
            row, scratch_row = c.to(tl.int64) * D, s.to(tl.int64) * D
            active, largest, _ = _gradient_stats(scratch_ptr + scratch_row, D, ACC, BLOCK_UPDATE)
            _update_class(delta_ptr + row, scratch_ptr + scratch_row, c, D, step_ptr, eps_ptr, direction_ptr, active,
                          largest, radius_margin, L2, ACC, BLOCK_UPDATE)


def _in_kernel_dtype(delta: torch.Tensor, launch) -> None:
    """Run ``launch(kernel_delta)`` on ``delta`` itself, or on a float32 copy written back (bfloat16
    under the CPU interpreter)."""
    kdelta = kernel_dtype_view(delta)
    launch(kdelta)
    if kdelta is not delta:
        delta.copy_(kdelta)


def pgd_step(delta, grad, step, eps, direction, norm, ok=None, skipped=None):
    """``PGDLaunchers.pgd_step``; with ``ok`` and ``skipped``, the guarded step in the same single launch."""
    K, D = delta.shape
    if delta.numel() == 0:
        return
    kgrad = kernel_dtype_view(grad.contiguous())
    block = min(triton.next_power_of_2(D), BLOCK_UPDATE)
    guard = ok is not None
    _in_kernel_dtype(delta, lambda kdelta: _pgd_step_kernel[(K,)](
        kdelta, kgrad, step, eps, direction, ok if guard else step, skipped if guard else step, D,
        l2_radius_margin(accumulator_dtype(delta, grad)),
        GUARD=guard, L2=norm == "l2", ACC=accumulator(delta, grad), BLOCK=block,
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
    acc_dtype = accumulator_dtype(delta, grad_out, h)
    block_d, block_q, block_p, R = reduction_tiling(B, F, D, inner)
    num_d_blocks = triton.cdiv(D, block_d)
    plan = chunk_plan(segment_start, R, B * R, block_q, num_d_blocks)
    scratch = torch.empty((segments, D), dtype=acc_dtype, device=delta.device)
    counters = torch.zeros(segments * (num_d_blocks + 1), dtype=torch.int32, device=delta.device)
    finished, arrivals = counters[:segments], counters[segments:]
    if plan is None:  # one program per (segment, d-block)
        chunk, chunk_segment, first_chunk, programs, partial = 0, segment_start, segment_start, segments, scratch
    else:
        chunk, chunk_segment, first_chunk = plan
        programs = chunk_segment.numel()
        partial = torch.empty((programs, D), dtype=acc_dtype, device=delta.device)
    _in_kernel_dtype(delta, lambda kdelta: _class_grad_pgd_step_kernel[(programs * num_d_blocks,)](
        kdelta, kgrad_out, kgrad_out if kh is None else kh, scratch, partial, arrivals, finished, order,
        segment_class, segment_start, chunk_segment, first_chunk, step, eps, direction,
        K, segments, F, D, inner, R, num_d_blocks, chunk, D * inner, block_d * inner, l2_radius_margin(acc_dtype),
        SPLIT=plan is not None, SCALE=mode == "scale", L2=norm == "l2", ACC=accumulator(delta, grad_out, h),
        BLOCK_D=block_d, BLOCK_Q=block_q, SLABS=block_p > 0, BLOCK_P=max(block_p, 1),
        BLOCK_UPDATE=min(triton.next_power_of_2(D), BLOCK_UPDATE),
        num_warps=8,  # with 4, ptxas spilled 8 B per thread on sm_80 (at 56 registers)
    ))
