"""Triton kernels for ``perturb`` (forward) and its backward / ``class_grad``.

Flattened view used by every launcher: ``h (B, F)``, ``labels (B,)``, ``delta (K, D)``, and feature
``f`` of a sample reads ``delta[y, (f // inner) % D]``. Writing ``f = (o * D + d) * inner + i`` with
``o < outer = F // (D * inner)`` and ``i < inner`` splits a sample into ``D`` groups of
``R = outer * inner`` features each; ``grad_delta[c, d]`` sums one group over the samples of class c.

Backward is a deterministic segmented reduction: the samples are ordered by class (stable sort, so
the order is fixed) into at most ``min(B, K)`` segments, one per class present (``class_segments``),
and program ``(segment, d-block)`` walks the ``n_c * R`` rows ``(sample, r)`` of its class in tiles,
accumulating ``grad_delta`` in float32 (float64 for float64 inputs) and writing
``grad_h`` for the same tile: every element of ``grad_out`` is read once and ``grad_h`` written once.
When that gives too few programs to fill the device (few classes, or one dominant class, with
small ``D``), each class's rows are cut into chunks of CHUNK rows, one program each; programs write
partial sums and a second small kernel adds each class's partials in chunk order (``chunk_plan``).
The grids cover segments, not classes, so K >> B launches no empty programs; classes absent from the
batch get their zero gradient from the zero-filled output instead.
No atomics anywhere, so the result is bitwise reproducible from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import compute_dtype, interpreter_dtype, new_output

# Elements per program tile: large enough to keep a GPU's memory system busy, small enough for
# the float32 accumulator to stay in registers (4096 fp32 = 32 per thread at 4 warps).
TILE = 4096


def kernel_dtype_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in a dtype the kernels may take here (bfloat16 upcast under the CPU interpreter)."""
    return None if t is None else t.to(interpreter_dtype(t.dtype))


def accumulator_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype for these inputs: float64 if any is float64, else float32."""
    return compute_dtype(*(t.dtype for t in tensors if t is not None))


def accumulator(*tensors: torch.Tensor | None) -> tl.dtype:
    """:func:`accumulator_dtype` as the Triton dtype the kernels take."""
    return tl.float64 if accumulator_dtype(*tensors) == torch.float64 else tl.float32


def class_order(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, starts)``: sample indices sorted by class (stable), and ``starts (K + 1,)`` such that
    the samples of class c are ``order[starts[c]:starts[c + 1]]``."""
    order = torch.argsort(labels, stable=True)
    starts = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(torch.bincount(labels, minlength=num_classes), 0, out=starts[1:])
    return order, starts


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
def _forward_kernel(
    h_ptr, labels_ptr, delta_ptr, out_ptr,
    B, F, D, inner, num_f_blocks,
    SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # One [BLOCK_B, BLOCK_F] tile of (samples, features); the grid is 1-D so B has no grid limit.
    pid = tl.program_id(0)
    pid_b, pid_f = pid // num_f_blocks, pid % num_f_blocks
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    row_mask, col_mask = rows < B, cols < F
    mask = row_mask[:, None] & col_mask[None, :]
    y = tl.load(labels_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    d = tl.load(delta_ptr + y[:, None] * D + ((cols // inner) % D)[None, :], mask=mask, other=0).to(ACC)
    offs = rows[:, None] * F + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0).to(ACC)
    out = h * (1 + d) if SCALE else h + d
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _backward_kernel(
    grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, sums_ptr, order_ptr, segment_class_ptr, segment_start_ptr,
    chunk_segment_ptr, first_chunk_ptr, K, S, F, D, inner, R, num_d_blocks, CHUNK,
    SPLIT: tl.constexpr, SCALE: tl.constexpr, WRITE_GRAD_H: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # Without SPLIT, program (segment g, d-block) writes row c of grad_delta (K, D) for the class c of
    # its segment; padding segments (c == K) write nothing. With SPLIT, g is a chunk of CHUNK rows of
    # segment chunk_segment[g] and writes row g of the per-chunk partial sums; padding programs past
    # the last chunk (chunk_segment == S) fall on an empty row range. The grid is 1-D: no grid limit.
    pid = tl.program_id(0)
    g, d0 = pid // num_d_blocks, (pid % num_d_blocks) * BLOCK_D
    if SPLIT:
        s = tl.minimum(tl.load(chunk_segment_ptr + g), S - 1)
        c, start, rows = segment_span(segment_class_ptr, segment_start_ptr, s, R)
        row_lo = (g - tl.load(first_chunk_ptr + s)) * CHUNK
        row_hi = tl.minimum(row_lo + CHUNK, rows)
        out_row, written = g, D
    else:
        c, start, row_hi = segment_span(segment_class_ptr, segment_start_ptr, g, R)
        row_lo = 0
        out_row, written = c, tl.where(c < K, D, 0)
    # Clamped so that a padding segment's (unused) load of delta[c] stays in bounds.
    total = class_block_sum(
        grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, order_ptr, tl.minimum(c, K - 1), start, row_lo, row_hi,
        d0, F, D, inner, R, SCALE, WRITE_GRAD_H, ACC, BLOCK_D, BLOCK_Q,
    )
    d = d0 + tl.arange(0, BLOCK_D)
    tl.store(sums_ptr + out_row.to(tl.int64) * D + d, total.to(sums_ptr.dtype.element_ty), mask=d < written)


@triton.jit
def _sum_chunks_kernel(
    partial_ptr, segment_class_ptr, first_chunk_ptr, grad_delta_ptr, K, D, num_d_blocks,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_delta[c] = the partial sums of the chunks of c's segment, added in chunk order
    # (deterministic); padding segments (c == K) write nothing.
    pid = tl.program_id(0)
    s, d0 = pid // num_d_blocks, (pid % num_d_blocks) * BLOCK_D
    c = tl.load(segment_class_ptr + s)
    d = d0 + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for j in range(tl.load(first_chunk_ptr + s), tl.load(first_chunk_ptr + s + 1)):
        acc += tl.load(partial_ptr + j * D + d, mask=d < D, other=0)
    tl.store(grad_delta_ptr + c.to(tl.int64) * D + d, acc.to(grad_delta_ptr.dtype.element_ty), mask=d < tl.where(c < K, D, 0))


def perturb_forward(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, inner: int, mode: str) -> torch.Tensor:
    """``h (B, F)``, ``labels (B,)``, ``delta (K, D)`` contiguous -> ``h~ (B, F)`` in ``h.dtype``."""
    B, F = h.shape
    out = new_output((B, F), h.dtype, h.device)
    if out.numel() == 0:
        return out
    kh, kdelta = kernel_dtype_view(h), kernel_dtype_view(delta)
    kout = out if kh.dtype == h.dtype else new_output((B, F), kh.dtype, h.device)
    block_f = min(triton.next_power_of_2(F), 1024)
    block_b = min(max(TILE // block_f, 1), triton.next_power_of_2(B))
    num_f_blocks = triton.cdiv(F, block_f)
    grid = (triton.cdiv(B, block_b) * num_f_blocks,)
    _forward_kernel[grid](
        kh, labels, kdelta, kout, B, F, delta.shape[1], inner, num_f_blocks,
        SCALE=mode == "scale", ACC=accumulator(h, delta), BLOCK_B=block_b, BLOCK_F=block_f,
    )
    if kout is not out:
        out.copy_(kout)
    return out


def perturb_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor | None,
    labels: torch.Tensor,
    delta: torch.Tensor | None,
    num_classes: int,
    per_class: int,
    inner: int,
    mode: str,
    need_grad_h: bool,
    deterministic: bool,
    grad_delta_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(grad_h (B, F) or None, grad_delta (K, D))`` in one pass over ``grad_out (B, F)``.

    ``h`` is needed for ``scale``; ``delta`` only when ``need_grad_h`` in ``scale``. ``grad_h`` has
    ``grad_out.dtype``, ``grad_delta`` has ``grad_delta_dtype``. Always deterministic (fixed order,
    no atomics), so ``deterministic`` changes nothing.
    """
    B, F = grad_out.shape
    scale = mode == "scale"
    grad_h = new_output((B, F), grad_out.dtype, grad_out.device) if need_grad_h else None
    # Zero-filled rather than new_output (no NaN poisoning): no kernel writes the rows of classes
    # absent from the batch, by design, so this fill is their result, not a placeholder.
    grad_delta = torch.zeros((num_classes, per_class), dtype=grad_delta_dtype, device=grad_out.device)
    if grad_delta.numel() == 0 or B == 0:
        return grad_h, grad_delta
    kgrad_out, kh, kdelta = (kernel_dtype_view(t) for t in (grad_out, h, delta))
    kgrad_h = grad_h if grad_h is None or kgrad_out.dtype == grad_h.dtype else new_output((B, F), kgrad_out.dtype, grad_out.device)
    kgrad_delta = kernel_dtype_view(grad_delta)
    order, segment_class, segment_start = class_segments(labels, num_classes)
    segments = segment_class.numel()
    R = F // per_class
    block_d, block_q = reduction_blocks(per_class, inner, B * R)
    num_d_blocks = triton.cdiv(per_class, block_d)
    plan = chunk_plan(segment_start, R, B * R, block_q, num_d_blocks)
    acc = accumulator(grad_out, h, delta)
    if plan is None:  # one program per (segment, d-block) sums straight into grad_delta
        chunk, chunk_segment, first_chunk, sums, programs = 0, segment_start, segment_start, kgrad_delta, segments
    else:
        chunk, chunk_segment, first_chunk = plan
        programs = chunk_segment.numel()
        sums = torch.empty((programs, per_class), dtype=accumulator_dtype(grad_out, h, delta), device=grad_out.device)
    # Unused pointer arguments get grad_out as a stand-in; the constexpr flags keep them unread.
    _backward_kernel[(programs * num_d_blocks,)](
        kgrad_out, kgrad_out if kh is None else kh, kgrad_out if kdelta is None else kdelta,
        kgrad_out if kgrad_h is None else kgrad_h, sums, order, segment_class, segment_start, chunk_segment, first_chunk,
        num_classes, segments, F, per_class, inner, R, num_d_blocks, chunk,
        SPLIT=plan is not None, SCALE=scale, WRITE_GRAD_H=need_grad_h, ACC=acc, BLOCK_D=block_d, BLOCK_Q=block_q,
    )
    if plan is not None:
        block = min(triton.next_power_of_2(per_class), 1024)
        num_blocks = triton.cdiv(per_class, block)
        _sum_chunks_kernel[(segments * num_blocks,)](
            sums, segment_class, first_chunk, kgrad_delta, num_classes, per_class, num_blocks, ACC=acc, BLOCK_D=block)
    if kgrad_h is not grad_h:
        grad_h.copy_(kgrad_h)
    if kgrad_delta is not grad_delta:
        grad_delta.copy_(kgrad_delta)
    return grad_h, grad_delta
