"""Triton code shared by the ops' kernels: the deterministic per-class segmented reduction, its launch
plans, accumulation dtypes and what the CPU interpreter needs.

The reduction (used by ``perturb``'s backward, ``class_grad`` and the fused ``class_grad_pgd_step_``):
the samples are ordered by class (stable sort, so the order is fixed) into at most ``min(B, K)``
segments, one per class present (:func:`class_segments`); a program walks the ``n_c * R`` rows
``(sample, r)`` of its segment in ``[BLOCK_D, BLOCK_Q]`` tiles (:func:`reduction_blocks`,
:func:`class_block_sum`), and when that leaves the device idle the rows are cut into chunks
(:func:`chunk_plan`) whose partial sums are added in chunk order. No atomics, so results are bitwise
reproducible from run to run.

Under ``TRITON_INTERPRET=1`` bfloat16 arithmetic is wrong or fails, so kernels take bfloat16 tensors
upcast (:func:`kernel_dtype_view`), and :func:`parallel_programs` asks for few programs, so that the
tests exercise the chunked reduction too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import compute_dtype
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


def class_segments(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, segment_class, segment_start)``: sample indices sorted by class (stable), and the
    ``S = min(B, K)`` segments of that order, one per class present: segment s holds the samples
    ``order[segment_start[s]:segment_start[s + 1]]``, all of class ``segment_class[s]``. Segments past
    the classes present are padding: class ``K`` (no class) and no samples. ``S`` is known on the host,
    so the grids built on it need no device-to-host read; everything here stays on the device."""
    B = labels.numel()
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order].to(torch.int64)
    first = torch.ones(B, dtype=torch.bool, device=labels.device)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    segment = torch.cumsum(first, 0) - 1  # the segment of each sorted sample, non-decreasing
    segments = min(B, num_classes)
    # Gathers and a binary search rather than scatters: deterministic, and allowed under
    # torch.use_deterministic_algorithms on every device.
    segment_start = torch.searchsorted(segment, torch.arange(segments + 1, device=labels.device))
    first_labels = sorted_labels[segment_start[:-1].clamp_max(B - 1)]
    segment_class = torch.where(segment_start[:-1] < B, first_labels, num_classes)
    return order, segment_class, segment_start


def reduction_blocks(D: int, inner: int, rows: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_Q)`` for a ``[BLOCK_D, BLOCK_Q]`` tile of ``D`` groups by ``rows`` (sample, r)
    pairs. When ``inner == 1`` the groups are contiguous in memory, so the tile is wide in ``d``;
    otherwise consecutive rows are contiguous, so it is wide in ``q``."""
    block_d = min(triton.next_power_of_2(D), 256 if inner == 1 else 16)
    block_q = min(max(TILE // block_d, 1), triton.next_power_of_2(max(rows, 1)))
    return block_d, block_q


def parallel_programs(device: torch.device) -> int:
    """How many programs keep the device busy: a few per streaming multiprocessor on a GPU; a small
    number under the CPU interpreter (so that the tests there exercise the chunked reduction too)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def chunk_plan(segment_start: torch.Tensor, R: int, rows: int, block_q: int, num_d_blocks: int):
    """How to split the segments' rows across programs when one program per (segment, d-block) would
    leave the device idle (few classes, or one dominant class): ``(CHUNK, chunk_segment, first_chunk)``
    with segment s owning chunks ``first_chunk[s]:first_chunk[s + 1]`` (none for a padding segment)
    and ``chunk_segment`` mapping each of the ``S + cdiv(rows, CHUNK)`` programs (an upper bound on the
    chunk count, known without reading the counts back to the host) to its segment.
    None when no split is needed."""
    segments = segment_start.numel() - 1
    target = parallel_programs(segment_start.device)
    if segments * num_d_blocks >= target or rows <= block_q:
        return None
    chunk = triton.cdiv(triton.cdiv(rows * num_d_blocks, target), block_q) * block_q
    chunks = ((segment_start[1:] - segment_start[:-1]) * R + chunk - 1) // chunk
    first_chunk = torch.zeros_like(segment_start)
    torch.cumsum(chunks, 0, out=first_chunk[1:])
    programs = torch.arange(segments + triton.cdiv(rows, chunk), device=segment_start.device)
    return chunk, torch.searchsorted(first_chunk[1:], programs, right=True), first_chunk


@triton.jit
def segment_span(segment_class_ptr, segment_start_ptr, s, R):
    """``(c, start, rows)``: segment s holds class c, whose samples begin at ``order[start]`` and span
    ``rows`` (sample, r) rows. A padding segment has ``c == K`` and no rows."""
    start = tl.load(segment_start_ptr + s)
    return tl.load(segment_class_ptr + s), start, (tl.load(segment_start_ptr + s + 1) - start) * R


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
    if WRITE_GRAD_H and SCALE:
        factor = 1 + tl.load(delta_ptr + c.to(tl.int64) * D + d, mask=d_mask, other=0).to(ACC)
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
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0).to(ACC)
        if SCALE:
            acc += g * tl.load(h_ptr + offs, mask=mask, other=0).to(ACC)
        else:
            acc += g
        if WRITE_GRAD_H:
            grad_h = g * factor[:, None] if SCALE else g
            tl.store(grad_h_ptr + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
    return tl.sum(acc, axis=1)


