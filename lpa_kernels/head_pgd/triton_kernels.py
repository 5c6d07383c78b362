"""Triton fast path of ``head_pgd_``: T PGD steps on delta for a linear classifier head, no autograd.

The loop and its two formulations live in ``lpa_kernels/head_pgd/loop.py`` (shared with the CUDA C++
backend); its GEMMs are cuBLAS's. This backend supplies ``perturb``'s forward, the ``pgd_step`` and
fused ``class_grad_pgd_step`` updates, and two kernels of its own:

``_softmax_xent_grad_kernel`` (the rows form): ``out[b] = softmax(logits[b]) - onehot(y_b)`` for a tile
of ``BLOCK_B`` rows per program, in two passes over K in tiles of ``BLOCK_K``: the first
(``triton_softmax._softmax_stats``) finds each row's pivot and ``1 / sum``, the second writes the
probabilities minus the one-hot term and sums the true class's probability (``out`` may be ``logits``:
each element is read before it is written, by the same program). Arithmetic in float32 (float64 for
float64 data).

``_softmax_class_sum_kernel`` (the class-space form's step, fused): ``sums[c] = sum_{y_b = c}
softmax(logits[b] + shift[c]) - onehot(c)``, one program per class walking its samples in the label
plan's order (``order[starts[c]:starts[c + 1]]``) in tiles of ``BLOCK_B``. Phase 1 computes each
sample's pivot and ``1 / sum`` into a ``(2, B)`` scratch, and the true class's probability; phase 2, for
each ``BLOCK_K`` columns, sums the probabilities over the class's samples (a ``(BLOCK_B, BLOCK_K)``
accumulator reduced once, so the order is fixed) and writes them minus the class's sample count on the
diagonal. Every row of ``sums`` is written (absent classes: 0), so no zero fill, no ``(B, K)``
probabilities and no separate class reduction.

With a given direction and at most ``triton_fused.FUSED_MAX_CLASSES`` classes, the class-space form
runs all its steps in one launch instead (``triton_fused.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels.head_pgd.loop import FusedClassSpace, HeadKernels, run_head_pgd
from lpa_kernels._triton_common import accumulator, kernel_dtype_view
from lpa_kernels.head_pgd import triton_fused
from lpa_kernels.head_pgd.triton_softmax import NO_SHIFT, SHARED_SHIFT, TILE, _logits_tile, _softmax_stats, \
    class_sum_scale
from lpa_kernels.perturb.triton_kernels import perturb_forward
from lpa_kernels.pgd.triton_kernels import pgd_step, prepare_class_grad_pgd_step


@triton.jit
def _softmax_xent_grad_kernel(
    out_ptr,  # (B, K): softmax - onehot; may be logits_ptr
    logits_ptr,  # (B, K)
    labels_ptr,  # (B,) int32/int64
    p_true_ptr,  # (B,) ACC, written when WRITE_P_TRUE
    B,
    K,
    WRITE_P_TRUE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    y = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # padded rows read class 0, store nothing
    rows = rows.to(tl.int64)
    pivot, inv_sum = _softmax_stats(logits_ptr, logits_ptr, rows, row_ok, K, NO_SHIFT, ACC, BLOCK_B, BLOCK_K)
    p_true = tl.zeros((BLOCK_B,), ACC)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        z = _logits_tile(logits_ptr, logits_ptr, rows, cols, row_ok, K, NO_SHIFT, ACC)
        p = tl.exp(z - pivot[:, None]) * inv_sum[:, None]
        is_true = cols[None, :] == y[:, None]
        if WRITE_P_TRUE:
            p_true += tl.sum(tl.where(is_true, p, 0.0), axis=1)
        mask = row_ok[:, None] & (cols < K)[None, :]
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], tl.where(is_true, p - 1.0, p).to(out_ptr.dtype.element_ty),
                 mask=mask)
    if WRITE_P_TRUE:
        tl.store(p_true_ptr + rows, p_true, mask=row_ok)


@triton.jit
def _softmax_class_sum_kernel(
    sums_ptr,  # (K, K) out
    p_true_ptr,  # (B,) ACC, written when WRITE_P_TRUE
    scratch_ptr,  # (2, B) ACC: pivot and 1 / sum per position of the class order
    logits_ptr,  # (B, K)
    shift_ptr,  # (K, K)
    order_ptr,  # (B,) int64: sample indices sorted by class
    starts_ptr,  # (K + 1,) int64: class c's samples at order[starts[c]:starts[c + 1]]
    B,
    K,
    WRITE_P_TRUE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    c = tl.program_id(0)
    start, end = tl.load(starts_ptr + c), tl.load(starts_ptr + c + 1)
    shift_row = shift_ptr + c.to(tl.int64) * K
    # Phase 1: each sample's pivot and 1 / sum (and its true-class probability) into the scratch.
    for i0 in range(start, end, BLOCK_B):
        pos = i0 + tl.arange(0, BLOCK_B)
        row_ok = pos < end
        rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
        pivot, inv_sum = _softmax_stats(logits_ptr, shift_row, rows, row_ok, K, SHARED_SHIFT, ACC, BLOCK_B, BLOCK_K)
        tl.store(scratch_ptr + pos, pivot, mask=row_ok)
        tl.store(scratch_ptr + B + pos, inv_sum, mask=row_ok)
        if WRITE_P_TRUE:
            z_true = tl.load(logits_ptr + rows * K + c, mask=row_ok, other=0).to(ACC) + tl.load(shift_row + c).to(ACC)
            tl.store(p_true_ptr + rows, tl.exp(z_true - pivot) * inv_sum, mask=row_ok)
    tl.debug_barrier()  # phase 2 reads the scratch written by other threads of this program
    # Phase 2: the class's probabilities summed column block by column block, minus its count on the diagonal,
    # times its class_sum_scale in float16.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        total = tl.zeros((BLOCK_B, BLOCK_K), ACC)
        for i0 in range(start, end, BLOCK_B):
            pos = i0 + tl.arange(0, BLOCK_B)
            row_ok = pos < end
            rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
            pivot = tl.load(scratch_ptr + pos, mask=row_ok, other=0.0)
            inv_sum = tl.load(scratch_ptr + B + pos, mask=row_ok, other=0.0)  # 0: padded rows add nothing
            z = _logits_tile(logits_ptr, shift_row, rows, cols, row_ok, K, SHARED_SHIFT, ACC)
            total += tl.exp(z - pivot[:, None]) * inv_sum[:, None]
        sums = tl.sum(total, axis=0)
        sums = tl.where(cols == c, sums - (end - start).to(ACC), sums)
        if sums_ptr.dtype.element_ty == tl.float16:
            sums = sums * class_sum_scale(end - start).to(ACC)
        tl.store(sums_ptr + c.to(tl.int64) * K + cols, sums.to(sums_ptr.dtype.element_ty), mask=cols < K)


def softmax_class_sum(sums, logits, shift, labels, order, starts, p_true, scratch) -> None:
    """``HeadKernels.softmax_class_sum``: one program per class."""
    batch, num_classes = logits.shape
    ksums, klogits, kshift = (kernel_dtype_view(t) for t in (sums, logits, shift))
    block_k = min(triton.next_power_of_2(num_classes), TILE)
    block_b = min(max(TILE // block_k, 1), triton.next_power_of_2(max(batch, 1)))
    # The stand-in for an absent p_true is never written: WRITE_P_TRUE compiles that store out.
    _softmax_class_sum_kernel[(num_classes,)](
        ksums, scratch if p_true is None else p_true, scratch, klogits, kshift, order, starts, batch, num_classes,
        WRITE_P_TRUE=p_true is not None, ACC=accumulator(logits, shift), BLOCK_B=block_b, BLOCK_K=block_k,
    )
    if ksums is not sums:
        sums.copy_(ksums)


def softmax_xent_grad(out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, p_true: torch.Tensor | None) -> None:
    """``out = softmax(logits) - onehot(y)`` row by row (``HeadKernels.softmax_xent_grad``)."""
    batch, num_classes = logits.shape
    if batch == 0:
        return
    kout = kernel_dtype_view(out)
    klogits = kout if logits is out else kernel_dtype_view(logits)
    block_k = min(triton.next_power_of_2(num_classes), TILE)
    block_b = min(max(TILE // block_k, 1), triton.next_power_of_2(batch))
    # The stand-in for an absent p_true is never written: WRITE_P_TRUE compiles that store out.
    _softmax_xent_grad_kernel[(triton.cdiv(batch, block_b),)](
        kout, klogits, labels, kout if p_true is None else p_true, batch, num_classes,
        WRITE_P_TRUE=p_true is not None, ACC=accumulator(logits), BLOCK_B=block_b, BLOCK_K=block_k,
    )
    if kout is not out:
        out.copy_(kout)


KERNELS = HeadKernels(perturb=perturb_forward, prepare_class_grad_pgd_step=prepare_class_grad_pgd_step,
                      softmax_xent_grad=softmax_xent_grad, softmax_class_sum=softmax_class_sum, pgd_step=pgd_step,
                      fused_class_space=FusedClassSpace(triton_fused.serves, triton_fused.class_space_steps))


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, plan=None, ok=None,
             skipped=None) -> None:
    """``HeadPGDLaunchers.head_pgd``: ``loop.run_head_pgd`` on this backend's kernels."""
    run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, KERNELS, plan, ok, skipped)
