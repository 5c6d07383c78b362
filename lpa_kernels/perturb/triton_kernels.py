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
A class with more rows than one program's fair share of the work (few classes, or a dominant class
in a long-tailed batch) is cut into chunks of CHUNK rows, one program each (``chunk_plan``): its
chunks write partial sums and count their arrival, and the last to arrive adds the partials in chunk
order, in the same launch; a class of one chunk writes its sums directly.
The grids cover segments, not classes, so K >> B launches no empty programs; classes absent from the
batch get their zero gradient from the zero-filled output instead.
Channel-wise layouts (``inner > 1``) are reduced in *slabs* (``slab_blocks``): a program owns a few
whole groups, i.e. one contiguous run of ``groups * inner`` features per (sample, o) row whose start is
a multiple of 16 elements, so the bulk loads are 128-bit vectors and no index is divided per element;
each group's sum is taken over its positions once, at the end.
No value is ever accumulated atomically (atomics only count arrivals), so the result is bitwise
reproducible from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import new_output
from lpa_kernels._triton_common import (
    TILE, accumulator, accumulator_dtype, chunk_plan, chunked_class_sums, class_segments, kernel_dtype_view,
    reduction_tiling,
)


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
def _backward_kernel(
    grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, grad_delta_ptr, partial_ptr, arrivals_ptr, order_ptr,
    segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr,
    K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB,
    SPLIT: tl.constexpr, SCALE: tl.constexpr, WRITE_GRAD_H: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, SLABS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Row c of grad_delta (K, D) for each class c present; the 1-D grid has no grid limit.
    chunked_class_sums(
        grad_out_ptr, h_ptr, delta_ptr, grad_h_ptr, grad_delta_ptr, partial_ptr, arrivals_ptr, order_ptr,
        segment_class_ptr, segment_start_ptr, chunk_segment_ptr, first_chunk_ptr, tl.program_id(0),
        K, S, F, D, inner, R, num_d_blocks, CHUNK, DI, SLAB,
        SPLIT, False, SCALE, WRITE_GRAD_H, ACC, BLOCK_D, BLOCK_Q, SLABS, BLOCK_P,
    )


def perturb_forward(h, labels, delta, inner, mode):
    """``PerturbLaunchers.perturb_forward``."""
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


def perturb_backward(grad_out, h, labels, delta, num_classes, per_class, inner, mode, need_grad_h, grad_delta_dtype,
                     plan=None):
    """``PerturbLaunchers.perturb_backward``."""
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
    order, segment_class, segment_start = class_segments(labels, num_classes, plan)
    segments = segment_class.numel()
    block_d, block_q, block_p, R = reduction_tiling(B, F, per_class, inner)
    num_d_blocks = triton.cdiv(per_class, block_d)
    plan = chunk_plan(segment_start, R, B * R, block_q, num_d_blocks)
    acc = accumulator(grad_out, h, delta, grad_delta)  # float64 when any operand is (add mode saves no delta)
    if plan is None:  # one program per (segment, d-block) sums straight into grad_delta
        chunk, chunk_segment, first_chunk, programs = 0, segment_start, segment_start, segments
        partial, arrivals = kgrad_delta, segment_start  # unread stand-ins
    else:
        chunk, chunk_segment, first_chunk = plan
        programs = chunk_segment.numel()
        partial = new_output((programs, per_class), accumulator_dtype(grad_out, h, delta, grad_delta), grad_out.device)
        arrivals = torch.zeros(segments * num_d_blocks, dtype=torch.int32, device=grad_out.device)
    # Unused pointer arguments get grad_out as a stand-in; the constexpr flags keep them unread.
    _backward_kernel[(programs * num_d_blocks,)](
        kgrad_out, kgrad_out if kh is None else kh, kgrad_out if kdelta is None else kdelta,
        kgrad_out if kgrad_h is None else kgrad_h, kgrad_delta, partial, arrivals, order, segment_class, segment_start,
        chunk_segment, first_chunk,
        num_classes, segments, F, per_class, inner, R, num_d_blocks, chunk, per_class * inner, block_d * inner,
        SPLIT=plan is not None, SCALE=scale, WRITE_GRAD_H=need_grad_h, ACC=acc, BLOCK_D=block_d, BLOCK_Q=block_q,
        SLABS=block_p > 0, BLOCK_P=max(block_p, 1),
        num_warps=8,  # with 4, ptxas spilled 8 B per thread on sm_80 (bf16, last-dim layout)
    )
    if kgrad_h is not grad_h:
        grad_h.copy_(kgrad_h)
    if kgrad_delta is not grad_delta:
        grad_delta.copy_(kgrad_delta)
    return grad_h, grad_delta
