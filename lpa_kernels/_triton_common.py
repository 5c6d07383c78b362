"""Triton code shared by the ops' kernels: the deterministic per-class segmented reduction, its launch
plans, accumulation dtypes and what the CPU interpreter needs.

The reduction (used by ``perturb``'s backward, ``class_grad`` and the fused ``class_grad_pgd_step_``):
the samples are ordered by class (stable sort, so the order is fixed) into at most ``min(B, K)``
segments, one per class present (:func:`class_segments`); a program walks the ``n_c * R`` rows
``(sample, r)`` of its segment in ``[BLOCK_D, BLOCK_Q]`` tiles (:func:`reduction_blocks`,
:func:`class_block_sum`), or, on channel-wise layouts, whole groups at a time in contiguous slabs
loaded as 128-bit vectors (:func:`slab_blocks`, :func:`class_slab_sum`). A class with more rows than
one program's fair share (few classes, or the dominant class of a long-tailed batch) is cut into
chunks (:func:`chunk_plan`); the last chunk to arrive adds their partial sums in chunk order, in the
same launch, and sets its arrival counter back to 0 (:func:`chunked_class_sums`, :func:`reset_counter`).
No value is accumulated atomically (atomics only count arrivals), so results are bitwise reproducible
from run to run.

Under ``TRITON_INTERPRET=1`` bfloat16 arithmetic is wrong or fails, so kernels take bfloat16 tensors
upcast (:func:`kernel_dtype_view`), and :func:`parallel_programs` asks for few programs, so that the
tests exercise the chunked reduction too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lpa_kernels._common import class_segments, compute_dtype  # noqa: F401 (class_segments: the launchers import it from here)
from lpa_kernels.backend import interpreting

# Elements per program tile: large enough to keep a GPU's memory system busy, small enough for
# the float32 accumulator to stay in registers (4096 fp32 = 32 per thread at 4 warps).
TILE = 4096


def interpreter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Triton kernel may take under the CPU interpreter, where bfloat16 arithmetic is wrong
    or fails: bfloat16 is upcast to float32 there (and rounded back by the caller), never run as is."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def kernel_dtype_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in a dtype the kernels may take here (bfloat16 upcast under the CPU interpreter)."""
    return None if t is None else t.to(interpreter_dtype(t.dtype))


def accumulator_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype for these inputs: float64 if any is float64, else float32."""
    return compute_dtype(*(t.dtype for t in tensors if t is not None))


def accumulator(*tensors: torch.Tensor | None) -> tl.dtype:
    """:func:`accumulator_dtype` as the Triton dtype the kernels take."""
    return tl.float64 if accumulator_dtype(*tensors) == torch.float64 else tl.float32


def reduction_blocks(D: int, inner: int, rows: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_Q)`` for a ``[BLOCK_D, BLOCK_Q]`` tile of ``D`` groups by ``rows`` (sample, r)
    pairs. When ``inner == 1`` the groups are contiguous in memory, so the tile is wide in ``d``;
    otherwise consecutive rows are contiguous, so it is wide in ``q``."""
    block_d = min(triton.next_power_of_2(D), 256 if inner == 1 else 16)
    block_q = min(max(TILE // block_d, 1), triton.next_power_of_2(max(rows, 1)))
    return block_d, block_q


# Widest slab (features of one row a channel-wise program covers) and most groups per slab.
SLAB_TILE, SLAB_GROUPS = 4096, 16


def slab_blocks(D: int, inner: int, rows: int) -> tuple[int, int, int] | None:
    """``(groups, BLOCK_P, BLOCK_Q)`` for the channel-wise reduction (``inner > 1``): ``groups`` (a power of
    two) whole groups per program, so that one slab of ``groups * inner`` features is a multiple of 16 elements
    (16-byte aligned slab starts, hence vector loads, for every dtype) and fills its power-of-two tile
    ``BLOCK_P`` best (fewest groups among the best); ``BLOCK_Q`` of the ``rows`` (sample, o) rows per
    tile. None when no such slab fits in SLAB_TILE: the element-wise tiling then serves it."""
    if inner == 1:
        return None
    align = 16 // math.gcd(inner, 16)
    candidates = [align << j for j in range(5) if align << j <= SLAB_GROUPS and (align << j) * inner <= SLAB_TILE]
    if not candidates:
        return None
    fill = lambda g: g * inner / triton.next_power_of_2(g * inner)  # noqa: E731
    groups = max(candidates, key=lambda g: (fill(g), -g))
    block_p = triton.next_power_of_2(groups * inner)
    return groups, block_p, max(1, min(TILE // block_p, triton.next_power_of_2(rows)))


def reduction_tiling(B: int, F: int, D: int, inner: int) -> tuple[int, int, int, int]:
    """``(BLOCK_D, BLOCK_Q, BLOCK_P, R)`` of the backward reduction of ``(B, F)`` into ``D`` groups:
    slabs (``BLOCK_P > 0``, rows ``R = outer`` per sample) where :func:`slab_blocks` finds one, else the
    element-wise tiling (``BLOCK_P == 0``, rows ``R = F // D`` per sample)."""
    R = F // D
    slabs = slab_blocks(D, inner, B * R // inner)
    if slabs is None:
        return (*reduction_blocks(D, inner, B * R), 0, R)
    groups, block_p, block_q = slabs
    return groups, block_q, block_p, R // inner


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy: a few per streaming multiprocessor on a GPU; a small
    number under the CPU interpreter (so that the tests there exercise the chunked reduction too)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def chunk_plan(segment_start: torch.Tensor, R: int, rows: int, block_q: int, num_d_blocks: int):
    """How to cut the segments' rows into chunks of about one program's fair share of the work
    (``rows * num_d_blocks / parallel_programs``), so that neither few classes nor one dominant class
    (a long-tailed batch) leaves the device waiting on a few long programs: ``(CHUNK, chunk_segment,
    first_chunk)`` with segment s owning chunks ``first_chunk[s]:first_chunk[s + 1]`` (none for a
    padding segment) and ``chunk_segment`` mapping each of the ``S + cdiv(rows, CHUNK)`` programs (an
    upper bound on the chunk count, known without reading the counts back to the host) to its
    segment. None when no segment can need a second chunk."""
    segments = segment_start.numel() - 1
    target = parallel_programs(segment_start.device)
    chunk = triton.cdiv(triton.cdiv(rows * num_d_blocks, target), block_q) * block_q
    if chunk >= rows:
        return None
    programs = segments + triton.cdiv(rows, chunk)
    first_chunk = torch.empty_like(segment_start)
    chunk_segment = torch.empty(programs, dtype=torch.int64, device=segment_start.device)
    # one program, one launch (the same in torch ops would be eight: the counts, their cumsum, a search)
    _chunk_plan_kernel[(1,)](segment_start, first_chunk, chunk_segment, segments, programs, R, chunk,
                             max(segments, 1).bit_length(), BLOCK=CHUNK_PLAN_BLOCK)
    return chunk, chunk_segment, first_chunk


CHUNK_PLAN_BLOCK = 1024


@triton.jit
def _chunk_plan_kernel(segment_start_ptr, first_chunk_ptr, chunk_segment_ptr, segments, programs, R, CHUNK,
                       search_steps, BLOCK: tl.constexpr):
    """:func:`chunk_plan`'s tables in one program: ``first_chunk[s + 1] = first_chunk[s] + ceil(rows_s /
    CHUNK)`` (``rows_s`` segment s's ``(sample, r)`` rows), then for each program p the segment that owns it,
    ``#{s : first_chunk[s + 1] <= p}`` (``torch.searchsorted(first_chunk[1:], p, right=True)``; ``segments``
    past the last chunk), by a binary search of ``search_steps`` (the bit length of ``segments``) halvings."""
    tl.store(first_chunk_ptr, 0)
    carry = tl.zeros((), tl.int64)
    for s0 in range(0, segments, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        ok = s < segments
        start = tl.load(segment_start_ptr + s, mask=ok, other=0).to(tl.int64)
        end = tl.load(segment_start_ptr + s + 1, mask=ok, other=0).to(tl.int64)
        counts = (end - start) * R
        counts = (counts + CHUNK - 1) // CHUNK
        tl.store(first_chunk_ptr + 1 + s, carry + tl.cumsum(counts, 0), mask=ok)
        carry += tl.sum(counts, 0)
    tl.debug_barrier()  # the search reads first_chunk as written above, by the whole program
    for p0 in range(0, programs, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        lo = tl.zeros((BLOCK,), tl.int64)
        hi = tl.full((BLOCK,), segments, tl.int64)
        for _ in range(search_steps + 1):
            mid = (lo + hi) // 2
            below = tl.load(first_chunk_ptr + 1 + mid, mask=mid < hi, other=0) <= p
            lo = tl.where((mid < hi) & below, mid + 1, lo)
            hi = tl.where((mid < hi) & ~below, mid, hi)
        tl.store(chunk_segment_ptr + p, lo, mask=p < programs)


@triton.jit
def segment_span(segment_class_ptr, segment_start_ptr, s, R):
    """``(c, start, rows)``: segment s holds class c, whose samples begin at ``order[start]`` and span
    ``rows`` (sample, r) rows. A padding segment has ``c == K`` and no rows."""
    start = tl.load(segment_start_ptr + s)
    return tl.load(segment_class_ptr + s), start, (tl.load(segment_start_ptr + s + 1) - start) * R


@triton.jit
def _add_tile(acc, grad_out_ptr, h_ptr, grad_h_ptr, offs, mask, factor, SCALE: tl.constexpr,
              WRITE_GRAD_H: tl.constexpr, ACC: tl.constexpr):
    """``acc`` plus the tile ``grad_out[offs]`` (times ``h[offs]`` when SCALE); with WRITE_GRAD_H also
    writes ``grad_h[offs]``: ``grad_out``, times ``factor`` (``1 + delta``, broadcast to the tile) when SCALE."""
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0).to(ACC)
    if SCALE:
        acc += g * tl.load(h_ptr + offs, mask=mask, other=0).to(ACC)
    else:
        acc += g
    if WRITE_GRAD_H:
        grad_h = g * factor if SCALE else g
        tl.store(grad_h_ptr + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
    return acc


@triton.jit
def class_block_sum(
    grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, order_ptr,
    c, start, row_lo, row_hi, d0, F, D, inner, R,
    SCALE: tl.constexpr, WRITE_GRAD_H: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """The sum of ``grad_out`` (times ``h`` when SCALE) over rows ``[row_lo, row_hi)`` of class c
    (whose samples begin at ``order[start]``) for the groups ``d0:d0 + BLOCK_D``; also writes
    ``grad_h`` on those elements when WRITE_GRAD_H (``grad_out``, times ``1 + delta[c, d]`` when SCALE)."""
    d = d0 + tl.arange(0, BLOCK_D)
    d_mask = d < D
    factor = 1.0
    if WRITE_GRAD_H and SCALE:
        factor = (1 + tl.load(delta_ptr + c.to(tl.int64) * D + d, mask=d_mask, other=0).to(ACC))[:, None]
    # Row q of the class is (its q // R-th sample, feature r = q % R of the group); feature
    # f = (o * D + d) * inner + i with o = r // inner and i = r % inner. Only the tile start q0 is
    # divided in 64 bits; the per-element divisions stay in 32 bits (R < 2**31).
    group_offs = d * inner
    acc = tl.zeros((BLOCK_D, BLOCK_Q), dtype=ACC)
    for q0 in range(row_lo, row_hi, BLOCK_Q):
        local = (q0 % R).to(tl.int32) + tl.arange(0, BLOCK_Q)
        q_mask = q0 + tl.arange(0, BLOCK_Q) < row_hi
        sample = tl.load(order_ptr + start + q0 // R + local // R, mask=q_mask, other=0)
        r = local % R
        row_offs = sample * F + (r // inner) * D * inner + r % inner
        offs = group_offs[:, None] + row_offs[None, :]
        mask = d_mask[:, None] & q_mask[None, :]
        acc = _add_tile(acc, grad_out_ptr, h_ptr, grad_h_ptr, offs, mask, factor, SCALE, WRITE_GRAD_H, ACC)
    return tl.sum(acc, axis=1)


@triton.jit
def class_slab_sum(
    grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, order_ptr,
    c, start, row_lo, row_hi, d0, slab_start, slab_valid, F, DI, D, inner, R,
    SCALE: tl.constexpr, WRITE_GRAD_H: tl.constexpr, ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The channel-wise (``inner > 1``) form of :func:`class_block_sum`: the groups ``d0, d0 + 1, ...``
    lie in one contiguous *slab* of ``slab_valid`` features at ``slab_start`` of each row, so a tile is
    ``BLOCK_Q`` rows (``(sample, o)``: ``R = outer`` rows per sample, each ``DI = D * inner`` long) by
    ``BLOCK_P`` contiguous features, loaded with full-width vector accesses when the slab offsets are
    multiples of 16 elements. Returns the sum per slab position ``(BLOCK_P,)``; the caller adds each
    group's ``inner`` positions. No index arithmetic per element: only per row and per program."""
    p = tl.arange(0, BLOCK_P)
    p_mask = p < slab_valid
    factor = 1.0
    if WRITE_GRAD_H and SCALE:
        d = d0 + p // inner  # once per program, not per loaded element
        factor = (1 + tl.load(delta_ptr + c.to(tl.int64) * D + d, mask=p_mask, other=0).to(ACC))[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=ACC)
    for q0 in range(row_lo, row_hi, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_mask = q < row_hi
        sample = tl.load(order_ptr + start + q // R, mask=q_mask, other=0)
        row_offs = sample * F + (q % R) * DI + slab_start
        offs = row_offs[:, None] + p[None, :]
        mask = q_mask[:, None] & p_mask[None, :]
        acc = _add_tile(acc, grad_out_ptr, h_ptr, grad_h_ptr, offs, mask, factor, SCALE, WRITE_GRAD_H, ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def store_group_sums(out_ptr, position_sums, d0, written, inner, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """``out[d0 + j] = `` the sum of slab positions ``j * inner .. (j + 1) * inner`` for ``j < GROUPS``
    with ``d0 + j < written``, each added in position order."""
    group = tl.arange(0, BLOCK_P) // inner
    for j in tl.static_range(GROUPS):
        total = tl.sum(tl.where(group == j, position_sums, 0), axis=0)
        tl.store(out_ptr + d0 + j, total.to(out_ptr.dtype.element_ty), mask=d0 + j < written)


@triton.jit
def chunked_class_sums(
    grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, out_ptr, partial_ptr, arrivals_ptr, order_ptr,
    segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr, pid,
    K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB,
    SPLIT: tl.constexpr, BY_SEGMENT: tl.constexpr, SCALE: tl.constexpr, WRITE_GRAD_H: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, SLABS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program ``pid`` of the class-sum reduction: writes its d-block of row c (the class, or s the
    segment when BY_SEGMENT) of ``out (., D)`` when it completes it. Returns ``(s, c, completed)``.

    Without SPLIT, program (segment s, d-block) sums all its class c's rows (padding segments,
    c == K, write nothing). With SPLIT, it sums chunk g - first_chunk[s] of segment s = chunk_segment[g]
    (programs past the last chunk do nothing). The only chunk of a segment writes ``out`` directly;
    the chunks of a longer segment write partial row g, count their arrival, and the last to arrive
    adds the segment's partials in chunk order (deterministic, whichever program that is).
    SLABS (channel-wise layouts): a d-block is BLOCK_D whole groups, one slab of SLAB features per
    (sample, o) row, rows R = outer per sample (class_slab_sum)."""
    g, d_block = pid // num_d_blocks, pid % num_d_blocks
    d0 = d_block * BLOCK_D
    if SPLIT:
        s = tl.minimum(tl.load(chunk_segment_ptr + g), S - 1)
        c, start, rows = segment_span(segment_class_ptr, segment_start_ptr, s, R)
        first = tl.load(first_chunk_ptr + s)
        chunks = tl.load(first_chunk_ptr + s + 1) - first
        row_lo = (g - first) * CHUNK
        row_hi = tl.minimum(row_lo + CHUNK, rows)
        mine = g - first < chunks
    else:
        s = g
        c, start, row_hi = segment_span(segment_class_ptr, segment_start_ptr, s, R)
        row_lo = 0
        mine = c < K
    # Clamped so that a padding segment's (unused) load of delta[c] stays in bounds.
    c = tl.minimum(c, K - 1)
    if SLABS:
        slab_start = d_block * SLAB
        sums = class_slab_sum(
            grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, order_ptr, c, start, row_lo, row_hi, d0, slab_start,
            tl.minimum(SLAB, DI - slab_start), F, DI, D, inner, R, SCALE, WRITE_GRAD_H, ACC, BLOCK_Q, BLOCK_P,
        )
    else:
        sums = class_block_sum(
            grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, order_ptr, c, start, row_lo, row_hi,
            d0, F, D, inner, R, SCALE, WRITE_GRAD_H, ACC, BLOCK_D, BLOCK_Q,
        )
    out_row = out_ptr + (s if BY_SEGMENT else c).to(tl.int64) * D
    written = tl.where(mine, D, 0)
    completed = mine
    if SPLIT:
        if chunks == 1:
            _store_sums(out_row, sums, d0, written, inner, SLABS, BLOCK_D, BLOCK_P)
        else:
            _store_sums(partial_ptr + g.to(tl.int64) * D, sums, d0, written, inner, SLABS, BLOCK_D, BLOCK_P)
            arrived = arrive(arrivals_ptr + s * num_d_blocks + d_block, mine)
            completed = mine & (arrived == chunks - 1)
            if completed:
                reset_counter(arrivals_ptr + s * num_d_blocks + d_block)
                d = d0 + tl.arange(0, BLOCK_D)
                total = tl.zeros((BLOCK_D,), dtype=ACC)
                partial_row = partial_ptr + first.to(tl.int64) * D + d
                for _ in range(0, chunks):
                    total += tl.load(partial_row, mask=d < D, other=0)
                    partial_row += D
                tl.store(out_row + d, total.to(out_ptr.dtype.element_ty), mask=d < D)
    else:
        _store_sums(out_row, sums, d0, written, inner, SLABS, BLOCK_D, BLOCK_P)
    return s, c, completed


@triton.jit
def arrive(counter_ptr, mine):
    """Counts this program's arrival at ``counter`` (when ``mine``) after everything it stored, and
    returns how many had arrived before it. Every thread's stores precede the count (a CTA barrier,
    then a release at GPU scope); the acquire lets the last to arrive read what the others stored."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, mask=mine, sem="acq_rel", scope="gpu")


@triton.jit
def reset_counter(counter_ptr):
    """Sets an arrival counter back to 0, called by the last program to arrive at it, so that the next
    launch on the same stream finds it zeroed without a fill launch. Every other program of the launch
    has counted itself (atomics on one address are totally ordered, and the last saw all the others'
    adds) and never touches the counter again; this store follows the last atomic in the coherence
    order of its address (it depends on the value that atomic returned), and the launch's end makes it
    visible to the next launch."""
    tl.store(counter_ptr, 0)


@triton.jit
def _store_sums(row_ptr, sums, d0, written, inner, SLABS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """``row[d0:d0 + BLOCK_D] = `` the d-block's group sums (from slab position sums when SLABS)."""
    if SLABS:
        store_group_sums(row_ptr, sums, d0, written, inner, BLOCK_D, BLOCK_P)
    else:
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(row_ptr + d, sums.to(row_ptr.dtype.element_ty), mask=d < written)


SINGLE_PROGRAM_KERNELS = (_chunk_plan_kernel,)  # launched on a grid of one program (lpa-bench static's list)
