"""Triton kernels for ``pgd_step_`` and the fused ``class_grad_pgd_step_``.

``pgd_step_`` with one program per class c updates ``delta[c] (D,)`` in place, looping over D in blocks:
1. statistics of the class gradient ``g_c``: whether any entry is non-zero (a class with an all-zero
   gradient keeps its delta, projection included) and its largest ``|entry|``;
2. ``linf``: write ``clamp(delta + step * dir * sign(g), -eps, eps)``;
   ``l2``: compute ``||g / largest||`` (no overflow; a row with Inf entries uses their sign pattern, see
   ``naive.py``), ``new = delta + step * dir * g / (||g|| + 1e-12)`` and ``||new||``, then write
   ``new`` scaled back onto the ball of radius ``eps - eps * l2_radius_margin`` when outside it.
NaN propagates as in the reference: a NaN gradient counts as non-zero, and no min/max drops it.

Few classes with long rows (``split.split_block``: fewer classes than 2 programs per multiprocessor,
a row over several blocks; K = 10, D = 4096 on an H100) would leave most of a GPU idle that way, so
``pgd_step_`` then runs over a (feature block, class) grid instead:
- ``linf`` unguarded: one launch (``_linf_split_kernel``). An entry's step needs no norm; the one
  row-wide fact, whether the class's gradient is non-zero somewhere, matters only to a block whose own
  gradient is zero everywhere and whose delta lies outside the ball (clamped if the class moves, kept
  if not): that block, rare in practice, scans its row's gradient itself.
- ``l2``, and the guarded step for both norms: two launches. Phase 1 (``_block_stats_kernel``) writes
  per (class, block) ``m_b = max |g|``, ``s_b = sum (g / m_b)^2``, ``p_b = sum delta * g / m_b``,
  ``q_b = sum delta^2`` and whether the block holds a non-zero / non-finite gradient entry. Phase 2
  (``_block_update_kernel``) combines its row's partials into the scaled norm
  ``||g / M||^2 = sum_b s_b (m_b / M)^2`` (``M = max_b m_b``; LAPACK's scaled sum of squares, so no
  overflow) and, with ``a = step * dir / (||g / M|| + 1e-12 / M)``, the norm of the moved row
  ``||delta + a g / M||^2 = q + 2 a <delta, g / M> + a^2 ||g / M||^2`` without having it; then it
  writes its block. Rows holding Inf: a block with Inf scales by its sign pattern (``m_b = Inf``,
  factor 1), the others count 0, as ``naive.l2_unit``. A per-class arrival counter could fold the two
  phases into one launch only by making the last block of a class update the whole row, the serial
  tail the split removes; a second launch over K x D x 4-byte rows costs less.
The expansion rounds differently from summing the moved row: a few ulps of ``||delta||^2 + a^2``
relative to the norm, inside the projection's margin (``l2_radius_margin``), so no class ends above eps.

The fused kernel reduces ``g_c`` from ``grad_out`` with ``perturb``'s backward reduction
(``chunked_class_sums``: programs over (row chunk, feature block), long classes cut into chunks, so
K = 10 or a long-tailed batch fills the device) into a float32 (float64) scratch row per segment of
the class-sorted batch. The program that completes a feature block of a segment's row also writes the
block's phase-1 partials; the program that completes the row's last block (an arrival count per
segment) combines them and writes the update in one pass over the row, in the same launch (the
update's serial part per class is that one pass, not the four of the one-program-per-class step).
Classes absent from the batch have a zero gradient, so they keep their delta: no program touches them.
Everything but the kernel depends on the labels and shapes only (segments, chunk plan, buffers, arrival
counters): ``prepare_class_grad_pgd_step`` builds it once and returns the launch, which a PGD loop
(``head_pgd_``'s rows form) repeats every step. The last program to arrive at a counter sets it back to
zero (``_triton_common.reset_counter``), so each launch leaves the counters as it found them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import l2_radius_margin
from lpa_kernels.pgd import split
from lpa_kernels import _triton_common
from lpa_kernels._triton_common import (
    accumulator, accumulator_dtype, arrive, chunk_plan, chunked_class_sums, class_segments, kernel_dtype_view,
    reduction_tiling, reset_counter,
)

# Block of D one update pass handles at a time (one class row per program).
BLOCK_UPDATE = 1024
# Partials a phase-2 program of the split grid combines at a time.
STATS_BLOCK = 256


def split_block(K: int, D: int, device: torch.device) -> int | None:
    """``split.split_block`` for this device: 2 programs per multiprocessor (``parallel_programs``
    counts 4)."""
    # (looked up on the module at each call: lpa-bench static answers it as an H100 would)
    return split.split_block(K, D, _triton_common.parallel_programs(device) // 2)


@triton.jit
def rows_gradient_stats(grad_ptr, rows, row_ok, D, ACC: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
    """(Device function, public: ``head_pgd``'s fused kernel updates its rows with it and ``update_rows``.)
    Per row ``rows (R,)`` of ``grad (*, D)`` (``row_ok``: False for padding): ``(any entry is non-zero,
    largest |entry|, every entry is finite)``, each ``(R,)``."""
    largest = tl.zeros((R, BLOCK), dtype=ACC)
    nonzero = tl.zeros((R, BLOCK), dtype=tl.int32)
    nonfinite = tl.zeros((R, BLOCK), dtype=tl.int32)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0).to(ACC)
        largest = tl.maximum(largest, tl.abs(g))
        nonzero = tl.maximum(nonzero, (g != 0).to(tl.int32))
        nonfinite = tl.maximum(nonfinite, _not_finite(g).to(tl.int32))
    return tl.max(nonzero, axis=1) > 0, tl.max(largest, axis=1), tl.max(nonfinite, axis=1) == 0


@triton.jit
def _gradient_stats(grad_ptr, D, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``rows_gradient_stats`` of the one row at ``grad_ptr``, as scalars."""
    row = tl.zeros((1,), dtype=tl.int64)
    active, largest, finite = rows_gradient_stats(grad_ptr, row, row == 0, D, ACC, 1, BLOCK)
    return tl.max(active.to(tl.int32), axis=0) > 0, tl.max(largest, axis=0), tl.max(finite.to(tl.int32), axis=0) > 0


@triton.jit
def _signum(x):
    """sign(x), but NaN stays NaN (``torch.sign`` gives 0 there, which would hide a NaN gradient)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


@triton.jit
def _clamp(x, eps):
    """``x`` clamped to [-eps, eps]; NaN stays NaN."""
    return tl.where(x > eps, eps, tl.where(x < -eps, -eps, x))


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
def update_rows(
    delta_ptr, grad_ptr, rows, D, step, eps, active, largest, radius_margin, rounded_ptr,
    L2: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, ROUNDED: tl.constexpr,
):
    """Write the PGD update of the rows ``rows (R,)`` of ``delta (*, D)`` from those of ``grad`` where
    ``active (R,)`` (an inactive row writes nothing; every row must exist): ``step`` (step size times direction),
    ``eps`` and ``largest`` (``rows_gradient_stats``) are ``(R,)``. ``ROUNDED``: every row's new value (an
    inactive row's old one) also into ``rounded`` (same shape, its own dtype), in the same pass."""
    offsets = rows[:, None] * D
    live = active[:, None] != 0  # (!= 0: the interpreter may hold int1 as wider integers)
    if L2:
        infinite = _not_finite(largest)[:, None]  # Inf (or NaN, which then reaches every entry through the norm)
        largest = tl.where(largest > 0, largest, 1.0)[:, None]  # an all-zero row writes nothing: avoid 0 / 0
        scaled_sumsq = tl.zeros((R, BLOCK), dtype=ACC)
        for d0 in range(0, D, BLOCK):
            d = (d0 + tl.arange(0, BLOCK))[None, :]
            s = _scaled(tl.load(grad_ptr + offsets + d, mask=d < D, other=0).to(ACC), largest, infinite)
            scaled_sumsq += tl.where(d < D, s * s, 0)
        tiny = tl.where(infinite, 0.0, 1e-12 / largest)
        step = step[:, None] / (tl.sqrt(tl.sum(scaled_sumsq, axis=1))[:, None] + tiny)
        new_sumsq = tl.zeros((R, BLOCK), dtype=ACC)
        for d0 in range(0, D, BLOCK):
            d = (d0 + tl.arange(0, BLOCK))[None, :]
            g = _scaled(tl.load(grad_ptr + offsets + d, mask=d < D, other=0).to(ACC), largest, infinite)
            new = tl.load(delta_ptr + offsets + d, mask=d < D, other=0).to(ACC) + step * g
            new_sumsq += tl.where(d < D, new * new, 0)
        length = tl.sqrt(tl.sum(new_sumsq, axis=1))[:, None]
        radius = (eps - eps * radius_margin)[:, None]
    else:
        step = step[:, None]
        eps = eps[:, None]
    for d0 in range(0, D, BLOCK):
        d = (d0 + tl.arange(0, BLOCK))[None, :]
        mask = live & (d < D)
        old = tl.load(delta_ptr + offsets + d, mask=(d < D) if ROUNDED else mask, other=0).to(ACC)
        g = tl.load(grad_ptr + offsets + d, mask=mask, other=0).to(ACC)
        if L2:
            new = old + step * _scaled(g, largest, infinite)
            new = new * (radius / tl.maximum(length, radius))  # 1 inside the ball; no 0 / 0 for a zero row
        else:
            new = _clamp(old + step * _signum(g), eps)
        new = new.to(delta_ptr.dtype.element_ty)
        tl.store(delta_ptr + offsets + d, new, mask=mask)
        if ROUNDED:
            kept = tl.where(live, new, old.to(delta_ptr.dtype.element_ty))
            tl.store(rounded_ptr + offsets + d, kept.to(rounded_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _update_class(
    delta_ptr, grad_ptr, c, D, step_ptr, eps_ptr, direction_ptr, active, largest, radius_margin, rounded_ptr,
    L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ROUNDED: tl.constexpr,
):
    """``update_rows`` of the one row at ``delta_ptr`` / ``grad_ptr`` (/ ``rounded_ptr``), class ``c`` (scalar
    ``active``, ``largest``)."""
    row = tl.zeros((1,), dtype=tl.int64)
    step = tl.load(step_ptr + c + row).to(ACC) * tl.load(direction_ptr + c + row).to(ACC)
    update_rows(delta_ptr, grad_ptr, row, D, step, tl.load(eps_ptr + c + row).to(ACC), (row == 0) & active,
                 largest + tl.zeros((1,), dtype=ACC), radius_margin, rounded_ptr, L2, ACC, 1, BLOCK, ROUNDED)


@triton.jit
def _pgd_step_kernel(
    delta_ptr, grad_ptr, step_ptr, eps_ptr, direction_ptr, ok_ptr, skipped_ptr, rounded_ptr, D, radius_margin,
    GUARD: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ROUNDED: tl.constexpr,
):
    # GUARD (the training step's update, ``naive.guarded_pgd_step_``): a class whose gradient is not
    # finite, or every class when *ok_ptr is False, keeps its delta; non-finite classes of an ok batch
    # are counted into *skipped_ptr. ROUNDED: the new delta also into rounded (update_rows).
    c = tl.program_id(0)
    row = c.to(tl.int64) * D
    active, largest, finite = _gradient_stats(grad_ptr + row, D, ACC, BLOCK)
    if GUARD:
        ok = tl.load(ok_ptr) != 0
        active = active & finite & ok
        skip = ok & (finite == 0)  # only a skipped class adds: K programs adding 0 would queue on one address
        tl.atomic_add(skipped_ptr, skip.to(tl.int64), mask=skip)
    _update_class(delta_ptr + row, grad_ptr + row, c, D, step_ptr, eps_ptr, direction_ptr, active, largest,
                  radius_margin, rounded_ptr + row, L2, ACC, BLOCK, ROUNDED)


@triton.jit
def _class_grad_pgd_step_kernel(
    delta_ptr, grad_out_ptr, h_ptr, scratch_ptr, partial_ptr, arrivals_ptr, finished_ptr, stats_ptr, order_ptr,
    segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr,
    step_ptr, eps_ptr, direction_ptr, K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB, radius_margin,
    SPLIT: tl.constexpr, SCALE: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, SLABS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_UPDATE: tl.constexpr,
    STATS_BLOCK: tl.constexpr,
):
    # Phase 1, over the whole (chunk, d-block) grid: the class sums of each segment s into scratch row
    # s (perturb's chunked reduction); the program completing a d-block of row s also writes that
    # block's partials (the split step's, ``_store_partials``) into stats[:, s, d-block]. Phase 2: the
    # program completing the last d-block of segment s (counted in finished[s]) combines the row's
    # partials and writes the PGD update of its class c in one pass over the row. A padding segment
    # has no rows: nothing completes it, so no program touches its (clamped) class.
    s, c, completed = chunked_class_sums(
        grad_out_ptr, h_ptr, grad_out_ptr, grad_out_ptr, scratch_ptr, partial_ptr, arrivals_ptr, order_ptr,
        segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr, tl.program_id(0),
        K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB,
        SPLIT, True, SCALE, False, ACC, BLOCK_D, BLOCK_Q, SLABS, BLOCK_P,
    )
    if completed:
        row, scratch_row, d_block = c.to(tl.int64) * D, s.to(tl.int64) * D, tl.program_id(0) % num_d_blocks
        tl.debug_barrier()  # the d-block just stored, read back by other threads of the program
        d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        g = tl.load(scratch_ptr + scratch_row + d, mask=d < D, other=0)
        _store_partials(stats_ptr + s.to(tl.int64) * num_d_blocks + d_block, S * num_d_blocks, g, delta_ptr + row + d,
                        d < D, L2, ACC)
        finished = arrive(finished_ptr + s, completed)
        if finished == num_d_blocks - 1:
            reset_counter(finished_ptr + s)  # zero again for the next launch of a prepared step
            active, _, largest, sumsq, dot, delta_sumsq = _row_stats(stats_ptr, s, S, num_d_blocks, L2, ACC,
                                                                     STATS_BLOCK)
            step, eps, along, scale, largest, infinite = _step_coefficients(
                step_ptr, eps_ptr, direction_ptr, c, largest, sumsq, dot, delta_sumsq, radius_margin, ACC)
            written = tl.where(active, D, 0)  # an inactive class writes nothing
            for e0 in range(0, D, BLOCK_UPDATE):  # (not d: a loop may not change its shape)
                e = e0 + tl.arange(0, BLOCK_UPDATE)
                _apply_step(delta_ptr + row, scratch_ptr + scratch_row, e, e < written, step, eps, along, scale,
                            largest, infinite, L2, ACC)


@triton.jit
def _split_block(b, c, D, BLOCK: tl.constexpr):
    """Feature block b of class c on the split grid: ``(row offset c * D, its entries d, d < D)``."""
    d = b * BLOCK + tl.arange(0, BLOCK)
    return c.to(tl.int64) * D, d, d < D


@triton.jit
def _linf_split_kernel(delta_ptr, grad_ptr, step_ptr, eps_ptr, direction_ptr, D, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    # Program (feature block b, class c) of the unguarded linf step (see the module doc).
    b, c = tl.program_id(0), tl.program_id(1)
    row, d, mask = _split_block(b, c, D, BLOCK)
    g = tl.load(grad_ptr + row + d, mask=mask, other=0).to(ACC)
    old = tl.load(delta_ptr + row + d, mask=mask, other=0).to(ACC)
    eps = tl.load(eps_ptr + c).to(ACC)
    active = tl.max((g != 0).to(tl.int32), axis=0) > 0
    outside = tl.max((tl.abs(old) > eps).to(tl.int32), axis=0) > 0
    if outside & (active == 0):  # only the row can tell whether these entries are clamped or kept
        active, _, _ = _gradient_stats(grad_ptr + row, D, ACC, BLOCK)
    step = tl.load(step_ptr + c).to(ACC) * tl.load(direction_ptr + c).to(ACC)
    new = _clamp(old + step * _signum(g), eps)
    tl.store(delta_ptr + row + d, new.to(delta_ptr.dtype.element_ty), mask=d < tl.where(active, D, 0))


@triton.jit
def _block_stats_kernel(delta_ptr, grad_ptr, stats_ptr, K, D, NB, L2: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Phase 1 of the split step: program (feature block b, class c) writes stats[:, c, b].
    b, c = tl.program_id(0), tl.program_id(1)
    row, d, mask = _split_block(b, c, D, BLOCK)
    g = tl.load(grad_ptr + row + d, mask=mask, other=0).to(ACC)
    _store_partials(stats_ptr + c * NB + b, K * NB, g, delta_ptr + row + d, mask, L2, ACC)


@triton.jit
def _store_partials(at, plane, g, delta_ptrs, mask, L2: tl.constexpr, ACC: tl.constexpr):
    """The ``split.N_STATS`` partials of one block (gradient entries ``g``, delta at ``delta_ptrs``,
    masked entries 0) at ``at + i * plane``, in that order (the sums for L2 only). ``plane`` in int64: the
    stats of the fused step hold 6 planes of (segments x feature blocks), past 2^31 at large K."""
    plane = tl.cast(plane, tl.int64)
    tl.store(at + 4 * plane, tl.max((g != 0).to(ACC), axis=0))
    tl.store(at + 5 * plane, tl.max(_not_finite(g).to(ACC), axis=0))
    if L2:
        old = tl.load(delta_ptrs, mask=mask, other=0).to(ACC)
        largest = tl.max(tl.abs(g), axis=0)
        s = _scaled(g, tl.where(largest > 0, largest, 1.0), _not_finite(largest))
        tl.store(at, largest)
        tl.store(at + plane, tl.sum(s * s, axis=0))
        tl.store(at + 2 * plane, tl.sum(old * s, axis=0))
        tl.store(at + 3 * plane, tl.sum(old * old, axis=0))


@triton.jit
def _row_stats(stats_ptr, c, K, NB, L2: tl.constexpr, ACC: tl.constexpr, STATS_BLOCK: tl.constexpr):
    """Class c's phase-1 partials combined: ``(any g != 0, every g finite, M = max |g|, ||g / M||^2,
    <delta, g / M>, ||delta||^2)``; the last three are 0 unless L2."""
    row = stats_ptr + tl.cast(c, tl.int64) * NB
    plane = tl.cast(K, tl.int64) * NB  # as in _store_partials
    largest = tl.zeros((STATS_BLOCK,), dtype=ACC)
    nonzero = tl.zeros((STATS_BLOCK,), dtype=ACC)
    nonfinite = tl.zeros((STATS_BLOCK,), dtype=ACC)
    for j0 in range(0, NB, STATS_BLOCK):
        j = j0 + tl.arange(0, STATS_BLOCK)
        nonzero = tl.maximum(nonzero, tl.load(row + 4 * plane + j, mask=j < NB, other=0))
        nonfinite = tl.maximum(nonfinite, tl.load(row + 5 * plane + j, mask=j < NB, other=0))
        if L2:
            largest = tl.maximum(largest, tl.load(row + j, mask=j < NB, other=0))
    M = tl.max(largest, axis=0)
    sumsq = tl.zeros((STATS_BLOCK,), dtype=ACC)
    dot = tl.zeros((STATS_BLOCK,), dtype=ACC)
    delta_sumsq = tl.zeros((STATS_BLOCK,), dtype=ACC)
    if L2:
        infinite = _not_finite(M)
        safe = tl.where(M > 0, M, 1.0)
        for j0 in range(0, NB, STATS_BLOCK):
            j = j0 + tl.arange(0, STATS_BLOCK)
            m = tl.load(row + j, mask=j < NB, other=0)
            # Block b's partials were scaled by m_b: by M they take a factor m_b / M; in a row holding
            # Inf, the blocks with Inf (their sign patterns) count 1, the others 0 (times NaN stays NaN).
            factor = tl.where(infinite, tl.where(_not_finite(m), 1.0, 0.0), m / safe)
            sumsq += tl.load(row + plane + j, mask=j < NB, other=0) * factor * factor
            dot += tl.load(row + 2 * plane + j, mask=j < NB, other=0) * factor
            delta_sumsq += tl.load(row + 3 * plane + j, mask=j < NB, other=0)
    return (tl.max(nonzero, axis=0) > 0, tl.max(nonfinite, axis=0) == 0, M, tl.sum(sumsq, axis=0),
            tl.sum(dot, axis=0), tl.sum(delta_sumsq, axis=0))


@triton.jit
def _block_update_kernel(
    delta_ptr, grad_ptr, stats_ptr, step_ptr, eps_ptr, direction_ptr, ok_ptr, skipped_ptr, K, D, NB, radius_margin,
    GUARD: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, STATS_BLOCK: tl.constexpr,
):
    # Phase 2 of the split step: program (feature block b, class c) updates delta[c, block b] from its
    # row's partials (GUARD as in _pgd_step_kernel; the class's block 0 counts it into *skipped_ptr).
    b, c = tl.program_id(0), tl.program_id(1)
    row, d, _ = _split_block(b, c, D, BLOCK)
    active, finite, largest, sumsq, dot, delta_sumsq = _row_stats(stats_ptr, c, K, NB, L2, ACC, STATS_BLOCK)
    if GUARD:
        ok = tl.load(ok_ptr) != 0
        skip = ok & (finite == 0)
        tl.atomic_add(skipped_ptr, skip.to(tl.int64), mask=skip & (b == 0))
        active = active & finite & ok
    mask = d < tl.where(active, D, 0)  # an inactive class writes nothing: its delta stays exactly as it was
    step, eps, along, scale, largest, infinite = _step_coefficients(
        step_ptr, eps_ptr, direction_ptr, c, largest, sumsq, dot, delta_sumsq, radius_margin, ACC)
    _apply_step(delta_ptr + row, grad_ptr + row, d, mask, step, eps, along, scale, largest, infinite, L2, ACC)


@triton.jit
def _step_coefficients(step_ptr, eps_ptr, direction_ptr, c, largest, sumsq, dot, delta_sumsq, radius_margin,
                       ACC: tl.constexpr):
    """Class c's ``(step * dir, eps, along, scale, M, M is not finite)`` from its combined partials
    (``_row_stats``): the L2 step moves delta by ``along * g / M`` (``_scaled``), then multiplies it by
    ``scale`` (the projection: 1 inside the ball); ``M`` comes back as 1 for an all-zero row."""
    step = tl.load(step_ptr + c).to(ACC) * tl.load(direction_ptr + c).to(ACC)
    eps = tl.load(eps_ptr + c).to(ACC)
    infinite = _not_finite(largest)
    largest = tl.where(largest > 0, largest, 1.0)
    along = step / (tl.sqrt(sumsq) + tl.where(infinite, 0.0, 1e-12 / largest))
    # ||delta + along * g / M||^2 from the partials; rounding may take it a hair below 0 when it is 0. A
    # delta row holding +-Inf moves to a row of Inf norm (a finite step cannot cancel it), which the expansion
    # would make Inf - Inf = NaN and leave unprojected: its own Inf is kept (NaN stays NaN: not projected)
    moved = delta_sumsq + 2 * along * dot + along * along * sumsq
    length = tl.sqrt(tl.maximum(tl.where(_not_finite(delta_sumsq), delta_sumsq, moved), 0.0))
    radius = eps - eps * radius_margin
    return step, eps, along, radius / tl.maximum(length, radius), largest, infinite


@triton.jit
def _apply_step(delta_row, grad_row, d, mask, step, eps, along, scale, largest, infinite, L2: tl.constexpr,
                ACC: tl.constexpr):
    """Writes the step (``_step_coefficients``) into the entries ``d`` (where ``mask``) of a delta row."""
    g = tl.load(grad_row + d, mask=mask, other=0).to(ACC)
    old = tl.load(delta_row + d, mask=mask, other=0).to(ACC)
    if L2:
        new = (old + along * _scaled(g, largest, infinite)) * scale
    else:
        new = _clamp(old + step * _signum(g), eps)
    tl.store(delta_row + d, new.to(delta_row.dtype.element_ty), mask=mask)

def _in_kernel_dtype(delta: torch.Tensor, launch) -> None:
    """Run ``launch(kernel_delta)`` on ``delta`` itself, or on a float32 copy written back (bfloat16
    under the CPU interpreter)."""
    kdelta = kernel_dtype_view(delta)
    launch(kdelta)
    if kdelta is not delta:
        delta.copy_(kdelta)


def pgd_step(delta, grad, step, eps, direction, norm, ok=None, skipped=None, rounded=None):
    """``PGDLaunchers.pgd_step``; with ``ok`` and ``skipped``, the guarded step in the same launches; with
    ``rounded``, the new delta also into it, written by the update itself when ``delta`` is in the
    accumulation dtype on the one-program-per-class grid (else copied after)."""
    K, D = delta.shape
    if delta.numel() == 0:
        return
    kgrad = kernel_dtype_view(grad.contiguous())
    guard, l2 = ok is not None, norm == "l2"
    acc, acc_dtype = accumulator(delta, grad), accumulator_dtype(delta, grad)
    margin = l2_radius_margin(delta.dtype)
    ok, skipped = (ok, skipped) if guard else (step, step)  # unread placeholders
    block = split_block(K, D, delta.device)
    in_kernel = rounded is not None and block is None and delta.dtype == acc_dtype
    krounded = kernel_dtype_view(rounded) if in_kernel else None
    blocks = 0 if block is None else triton.cdiv(D, block)
    if block is None:
        def launch(kdelta):
            _pgd_step_kernel[(K,)](
                kdelta, kgrad, step, eps, direction, ok, skipped, kdelta if krounded is None else krounded, D, margin,
                GUARD=guard, L2=l2, ACC=acc, BLOCK=min(triton.next_power_of_2(D), BLOCK_UPDATE), ROUNDED=in_kernel)
    elif not (guard or l2):
        def launch(kdelta):
            _linf_split_kernel[(blocks, K)](kdelta, kgrad, step, eps, direction, D, ACC=acc, BLOCK=block)
    else:
        stats = torch.empty((split.N_STATS, K, blocks), dtype=acc_dtype, device=delta.device)

        def launch(kdelta):
            _block_stats_kernel[(blocks, K)](kdelta, kgrad, stats, K, D, blocks, L2=l2, ACC=acc, BLOCK=block)
            _block_update_kernel[(blocks, K)](
                kdelta, kgrad, stats, step, eps, direction, ok, skipped, K, D, blocks, margin, GUARD=guard, L2=l2,
                ACC=acc, BLOCK=block, STATS_BLOCK=min(triton.next_power_of_2(blocks), STATS_BLOCK))
    _in_kernel_dtype(delta, launch)
    if in_kernel:
        if krounded is not rounded:  # a float32 view (bfloat16 under the interpreter), rounded here
            rounded.copy_(krounded)
    elif rounded is not None:
        rounded.copy_(delta)


def class_grad_pgd_step(delta, grad_out, labels, h, step, eps, direction, inner, mode, norm, plan=None):
    """``PGDLaunchers.class_grad_pgd_step``: prepared and launched once."""
    prepare_class_grad_pgd_step(delta, grad_out, labels, h, inner, mode, norm, plan)(step, eps, direction)


def prepare_class_grad_pgd_step(delta, grad_out, labels, h, inner, mode, norm, plan=None):
    """``PGDLaunchers.prepare_class_grad_pgd_step``: the segments, chunk plan, buffers and zeroed arrival
    counters, once; the returned ``launch(step, eps, direction)`` is the kernel alone (the counters come
    back to zero at the end of each launch, see ``_class_grad_pgd_step_kernel``)."""
    K, D = delta.shape
    B, F = grad_out.shape
    if delta.numel() == 0 or B == 0:  # an empty batch leaves every class's delta as it is
        return lambda step, eps, direction: None
    kh = kernel_dtype_view(h)
    order, segment_class, segment_start = class_segments(labels, K, plan)
    segments = segment_class.numel()
    acc_dtype = accumulator_dtype(delta, grad_out, h)
    block_d, block_q, block_p, R = reduction_tiling(B, F, D, inner)
    num_d_blocks = triton.cdiv(D, block_d)
    plan = chunk_plan(segment_start, R, B * R, block_q, num_d_blocks)
    scratch = torch.empty((segments, D), dtype=acc_dtype, device=delta.device)
    stats = torch.empty((split.N_STATS, segments, num_d_blocks), dtype=acc_dtype, device=delta.device)
    counters = torch.zeros(segments * (num_d_blocks + 1), dtype=torch.int32, device=delta.device)
    finished, arrivals = counters[:segments], counters[segments:]
    if plan is None:  # one program per (segment, d-block)
        chunk, chunk_segment, first_chunk, programs, partial = 0, segment_start, segment_start, segments, scratch
    else:
        chunk, chunk_segment, first_chunk = plan
        programs = chunk_segment.numel()
        partial = torch.empty((programs, D), dtype=acc_dtype, device=delta.device)
    constants = dict(
        SPLIT=plan is not None, SCALE=mode == "scale", L2=norm == "l2", ACC=accumulator(delta, grad_out, h),
        BLOCK_D=block_d, BLOCK_Q=block_q, SLABS=block_p > 0, BLOCK_P=max(block_p, 1),
        BLOCK_UPDATE=min(triton.next_power_of_2(D), BLOCK_UPDATE),
        STATS_BLOCK=min(triton.next_power_of_2(num_d_blocks), STATS_BLOCK),
        num_warps=8,  # with 4, ptxas spilled 8 B per thread on sm_80 (at 56 registers)
    )

    def launch(step, eps, direction):
        # grad_out's values change between launches: its kernel-dtype view (a copy only for bfloat16
        # under the interpreter) is taken at each one
        kgrad_out = kernel_dtype_view(grad_out)
        _in_kernel_dtype(delta, lambda kdelta: _class_grad_pgd_step_kernel[(programs * num_d_blocks,)](
            kdelta, kgrad_out, kgrad_out if kh is None else kh, scratch, partial, arrivals, finished, stats, order,
            segment_class, segment_start, chunk_segment, first_chunk, step, eps, direction,
            K, segments, F, D, inner, R, num_d_blocks, chunk, D * inner, block_d * inner, l2_radius_margin(delta.dtype),
            **constants,
        ))

    return launch
