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

``_softmax_class_sum_kernel`` (the class-space form's step, fused): one program per class, each running
``triton_softmax._softmax_class_sum`` (the per-class softmax sum, in the label plan's class order).

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
from lpa_kernels.head_pgd.triton_softmax import NO_SHIFT, TILE, _logits_tile, _softmax_class_sum, _softmax_stats
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
    _softmax_class_sum(tl.program_id(0), sums_ptr, p_true_ptr, scratch_ptr, logits_ptr, shift_ptr, order_ptr, starts_ptr,
                       B, K, WRITE_P_TRUE, ACC, BLOCK_B, BLOCK_K)


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


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, plan=None) -> None:
    """``HeadPGDLaunchers.head_pgd``: ``loop.run_head_pgd`` on this backend's kernels."""
    run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, KERNELS, plan)
