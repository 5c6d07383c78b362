"""All T steps of ``head_pgd_``'s class-space form in ONE Triton launch, for heads with few classes.

In class space (``loop.py``) a step reads, for class ``c``, only ``delta_c``, the weight ``W`` and the base
logits of class ``c``'s samples: ``E_c = delta_c @ W.T`` (its samples' logit shift), ``S_c =
sum_{y_b = c} softmax(base_b + E_c) - onehot(c)``, ``g_c = S_c @ W``, then the projected update of
``delta_c``. Nothing couples two classes once the direction is given (LPL's confidence rule couples them
through its threshold, so it keeps the launch-per-phase form). So one program per block of
``BLOCK_C = 16`` classes (the smallest M of a tensor-core tile) runs every step for its classes, with no
grid-wide synchronisation, each phase on the whole block at once:

1. ``E = current[block] @ W.T`` (``tl.dot``, 16 x 64 tiles over D; the iterate rounded to the GEMM dtype,
   as ``loop.py`` does), into a ``(K, K)`` float32 scratch;
2. the block's samples are contiguous in the label plan's class order
   (``order[starts[c0]:starts[c0 + 16]]``): one online pass gives each sample's softmax pivot and
   ``1 / sum`` of ``base_b + E[y_b]`` (``triton_softmax``, a per-row shift); a second, per ``BLOCK_K``
   columns, sums the probabilities per class as ``onehot (16 x BLOCK_B) @ P (BLOCK_B x BLOCK_K)`` (a
   float32 ``tl.dot``: a fixed order), minus each class's count on its diagonal, times its
   ``class_sum_scale`` (finite in float16 whatever the count), rounded to the GEMM
   dtype into a ``(K, K)`` scratch;
3. ``G = S[block] @ W`` (``tl.dot``) into a ``(K, D)`` float32 scratch;
4. ``pgd``'s update on the block's 16 rows at once (``rows_gradient_stats``, ``update_rows``; absent
   classes have a zero gradient and keep their delta).

Under the training step's guard (``GUARD``: ``loop.guarded``'s rule) the program first copies its rows
into a ``(K, D)`` scratch and, after the last step, puts that copy back into every row that is not finite
(or into all of them when the batch's ``ok`` is False), counting the non-finite rows of an ok batch into
``skipped`` with one integer atomic per program (exact, so the count does not depend on the order): the
guard's dozen torch ops around the launch become part of it.

A ``tl.debug_barrier`` between the phases orders one program's threads (each phase reads what the
others wrote). Against the launch-per-phase form: the same FLOPs, three launches fewer per step, but
``W`` is read twice per step by every program (``2 K D * K / 16`` elements instead of ``2 K D``; from L2
while ``K x D`` fits there) on ``K / 16`` multiprocessors only, so it serves ``K <= FUSED_MAX_CLASSES``
(MODELLED in ``lpa-bench static``). 16/32-bit GEMM dtypes only (``tl.dot`` has no float64 tensor-core
path); float32 GEMMs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` allows it, as cuBLAS
would. Under the CPU interpreter bfloat16 tiles are upcast to float32 (its bfloat16 ``tl.dot`` is wrong),
so there it checks the algorithm, not the bfloat16 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lpa_kernels._common import l2_radius_margin, new_output
from lpa_kernels._triton_common import kernel_dtype_view
from lpa_kernels.head_pgd.triton_softmax import ROW_SHIFT, _logits_tile, _softmax_stats, class_sum_scale
from lpa_kernels.pgd.triton_kernels import rows_gradient_stats, update_rows

FUSED_MAX_CLASSES = 256
BLOCK_C = 16  # classes per program: the smallest M of a tensor-core tile
BLOCK_DOT = 64  # the K and D extents of the GEMM tiles
FUSED_TILE = 1024  # elements of the softmax and update tiles


@triton.jit
def _class_space_steps_kernel(
    current_ptr,  # (K, D) ACC: the iterate, updated in place
    base_ptr,  # (B, K) GEMM dtype: h @ W.T + b
    weight_ptr,  # (K, D) GEMM dtype
    labels_ptr,  # (B,) int32/int64
    order_ptr,  # (B,) int64: sample indices sorted by class
    starts_ptr,  # (K + 1,) int64: class c's samples at order[starts[c]:starts[c + 1]]
    step_ptr, eps_ptr, direction_ptr,  # (K,) ACC
    shift_ptr,  # (K, K) ACC scratch: E rows
    sums_ptr,  # (K, K) GEMM dtype scratch: S rows
    grad_ptr,  # (K, D) ACC scratch: G rows
    softmax_ptr,  # (2, B) ACC scratch: each sample's pivot and 1 / sum
    previous_ptr,  # (K, D) ACC scratch: the rows before the steps (GUARD)
    ok_ptr,  # () bool: the batch's label verdict (GUARD and HAS_OK)
    skipped_ptr,  # () int64: non-finite rows of an ok batch are added (GUARD)
    B, K, D, steps, radius_margin,
    PRECISION: tl.constexpr, L2: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROW: tl.constexpr, GUARD: tl.constexpr, HAS_OK: tl.constexpr,
):
    c0 = tl.program_id(0) * BLOCK_C
    classes = c0 + tl.arange(0, BLOCK_C)
    class_ok = classes < K
    rows = classes.to(tl.int64)
    existing = tl.minimum(rows, K - 1)  # padding rows read the last class's row (the update writes none of them)
    dots = tl.arange(0, BLOCK_DOT)
    first, last = tl.load(starts_ptr + c0), tl.load(starts_ptr + tl.minimum(c0 + BLOCK_C, K))
    counts = (tl.load(starts_ptr + classes + 1, mask=class_ok, other=0)
              - tl.load(starts_ptr + classes, mask=class_ok, other=0)).to(ACC)
    step = tl.load(step_ptr + classes, mask=class_ok, other=0.0) * tl.load(direction_ptr + classes, mask=class_ok,
                                                                           other=0.0)
    eps = tl.load(eps_ptr + classes, mask=class_ok, other=1.0)
    if GUARD:
        for d0 in range(0, D, BLOCK_ROW):
            ds = d0 + tl.arange(0, BLOCK_ROW)
            at, inside = rows[:, None] * D + ds[None, :], class_ok[:, None] & (ds < D)[None, :]
            tl.store(previous_ptr + at, tl.load(current_ptr + at, mask=inside), mask=inside)
    for _step in range(steps):
        # 1. E[block] = current[block] @ W.T
        for k0 in range(0, K, BLOCK_DOT):
            ks = k0 + dots
            e = tl.zeros((BLOCK_C, BLOCK_DOT), tl.float32)
            for d0 in range(0, D, BLOCK_DOT):
                ds = d0 + dots
                a = tl.load(current_ptr + rows[:, None] * D + ds[None, :], mask=class_ok[:, None] & (ds < D)[None, :],
                            other=0.0).to(weight_ptr.dtype.element_ty)
                w = tl.load(weight_ptr + ks[None, :].to(tl.int64) * D + ds[:, None],
                            mask=(ks < K)[None, :] & (ds < D)[:, None], other=0.0)
                e += tl.dot(a, w, input_precision=PRECISION)
            tl.store(shift_ptr + rows[:, None] * K + ks[None, :], e.to(ACC), mask=class_ok[:, None] & (ks < K)[None, :])
        tl.debug_barrier()
        # 2. S[block]: each sample's softmax pivot and 1 / sum, then the per-class column sums
        for i0 in range(first, last, BLOCK_B):
            pos = i0 + tl.arange(0, BLOCK_B)
            pos_ok = pos < last
            samples = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
            shifts = shift_ptr + tl.load(labels_ptr + samples, mask=pos_ok, other=0).to(tl.int64) * K
            pivot, inv_sum = _softmax_stats(base_ptr, shifts, samples, pos_ok, K, ROW_SHIFT, ACC, BLOCK_B, BLOCK_K)
            tl.store(softmax_ptr + pos, pivot, mask=pos_ok)
            tl.store(softmax_ptr + B + pos, inv_sum, mask=pos_ok)
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            total = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
            nans = tl.zeros((BLOCK_C, BLOCK_K), tl.float32)
            for i0 in range(first, last, BLOCK_B):
                pos = i0 + tl.arange(0, BLOCK_B)
                pos_ok = pos < last
                samples = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
                labels = tl.load(labels_ptr + samples, mask=pos_ok, other=0).to(tl.int64)
                pivot = tl.load(softmax_ptr + pos, mask=pos_ok, other=0.0)
                inv_sum = tl.load(softmax_ptr + B + pos, mask=pos_ok, other=0.0)  # 0: padded rows add nothing
                z = _logits_tile(base_ptr, shift_ptr + labels * K, samples, cols, pos_ok, K, ROW_SHIFT, ACC)
                probs = (tl.exp(z - pivot[:, None]) * inv_sum[:, None]).to(tl.float32)
                onehot = tl.where((labels[None, :] == rows[:, None]) & pos_ok[None, :], 1.0, 0.0)
                # 0 * NaN is NaN: a NaN probability enters the dot as 0 and is counted apart, so that it
                # reaches its own class's sum only (as in the per-class sums of the definition)
                nan = probs != probs
                total += tl.dot(onehot, tl.where(nan, 0.0, probs), input_precision="ieee")
                nans += tl.dot(onehot, nan.to(tl.float32), input_precision="ieee")
            total -= tl.where(cols[None, :] == classes[:, None], counts[:, None], 0.0)
            if sums_ptr.dtype.element_ty == tl.float16:
                total = total * class_sum_scale(counts)[:, None]
            total = tl.where(nans > 0, float("nan"), total)
            tl.store(sums_ptr + rows[:, None] * K + cols[None, :], total.to(sums_ptr.dtype.element_ty),
                     mask=class_ok[:, None] & (cols < K)[None, :])
        tl.debug_barrier()
        # 3. G[block] = S[block] @ W
        for d0 in range(0, D, BLOCK_DOT):
            ds = d0 + dots
            g = tl.zeros((BLOCK_C, BLOCK_DOT), tl.float32)
            for k0 in range(0, K, BLOCK_DOT):
                ks = k0 + dots
                s = tl.load(sums_ptr + rows[:, None] * K + ks[None, :], mask=class_ok[:, None] & (ks < K)[None, :],
                            other=0.0)
                w = tl.load(weight_ptr + ks[:, None].to(tl.int64) * D + ds[None, :],
                            mask=(ks < K)[:, None] & (ds < D)[None, :], other=0.0)
                g += tl.dot(s, w, input_precision=PRECISION)
            tl.store(grad_ptr + rows[:, None] * D + ds[None, :], g.to(ACC), mask=class_ok[:, None] & (ds < D)[None, :])
        tl.debug_barrier()
        # 4. the projected update of the block's classes
        active, largest, _finite = rows_gradient_stats(grad_ptr, existing, class_ok, D, ACC, BLOCK_C, BLOCK_ROW)
        update_rows(current_ptr, grad_ptr, existing, D, step, eps, active & class_ok, largest, radius_margin,
                     current_ptr, L2, ACC, BLOCK_C, BLOCK_ROW, False)
        tl.debug_barrier()
    if GUARD:
        _, _, finite = rows_gradient_stats(current_ptr, existing, class_ok, D, ACC, BLOCK_C, BLOCK_ROW)
        restore = finite == 0
        counted = restore & class_ok
        if HAS_OK:  # a bad batch restores every row and counts none
            batch_ok = tl.load(ok_ptr + tl.zeros((BLOCK_C,), tl.int32)).to(tl.int32)  # per row: a mask of one shape
            restore, counted = restore | (batch_ok == 0), counted & (batch_ok != 0)
        tl.debug_barrier()  # the rows were read above by other threads than may write them below
        for d0 in range(0, D, BLOCK_ROW):
            ds = d0 + tl.arange(0, BLOCK_ROW)
            at, back = rows[:, None] * D + ds[None, :], (class_ok & restore)[:, None] & (ds < D)[None, :]
            tl.store(current_ptr + at, tl.load(previous_ptr + at, mask=back), mask=back)
        tl.atomic_add(skipped_ptr, tl.sum(counted.to(tl.int64), axis=0))


def serves(num_classes: int, gemm_dtype: torch.dtype) -> bool:
    """Whether the fused launch runs the class-space steps of ``num_classes`` classes (module docstring);
    ``loop.py`` also asks for a given direction and a float32 iterate."""
    return num_classes <= FUSED_MAX_CLASSES and gemm_dtype in (torch.float16, torch.bfloat16, torch.float32)


class Scratch(NamedTuple):
    """The fused launch's working buffers (both backends' kernels take the same): ``shift (K, K)``, ``sums
    (K, K)`` in the GEMM dtype, ``grad (K, D)``, ``softmax (2, B)`` and, under the guard, ``previous (K, D)``
    (else an empty tensor); float32 but ``sums``."""

    shift: torch.Tensor
    sums: torch.Tensor
    grad: torch.Tensor
    softmax: torch.Tensor
    previous: torch.Tensor


def scratch(batch: int, num_classes: int, features: int, sums_dtype: torch.dtype, device, guard: bool) -> Scratch:
    """:class:`Scratch` for one launch (``guard``: the training step's guard runs in it)."""
    acc = torch.float32
    return Scratch(new_output((num_classes, num_classes), acc, device),
                   new_output((num_classes, num_classes), sums_dtype, device),
                   new_output((num_classes, features), acc, device), new_output((2, batch), acc, device),
                   new_output((num_classes, features) if guard else (0,), acc, device))


def class_space_steps(current, base_logits, weight, labels, order, starts, step, eps, direction, steps: int,
                      norm: str, ok=None, skipped=None) -> None:
    """``steps`` class-space PGD steps on ``current (K, D)`` (float32, in place) in one launch:
    ``base_logits (B, K)`` and ``weight (K, D)`` in the GEMM dtype, ``labels (B,)`` with ``(order, starts)``
    their class order, ``step``, ``eps``, ``direction`` ``(K,)`` float32; with ``skipped`` (0-d int64),
    under ``loop.guarded``'s rule (``ok`` 0-d bool or None)."""
    batch, num_classes = base_logits.shape
    features = weight.shape[1]
    kbase, kweight = kernel_dtype_view(base_logits), kernel_dtype_view(weight)
    guard = skipped is not None
    buffers = scratch(batch, num_classes, features, kweight.dtype, current.device, guard)
    tf32 = kweight.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    # tl.dot: every extent >= 16; (BLOCK_B, BLOCK_K) and update tiles of FUSED_TILE elements
    block_k = max(min(triton.next_power_of_2(num_classes), FUSED_TILE // 16), 16)
    _class_space_steps_kernel[(triton.cdiv(num_classes, BLOCK_C),)](
        current, kbase, kweight, labels, order, starts, step, eps, direction, *buffers,
        ok if guard and ok is not None else current, skipped if guard else current,  # unread without the guard
        batch, num_classes, features, steps, l2_radius_margin(current.dtype),
        PRECISION="tf32" if tf32 else "ieee", L2=norm == "l2", ACC=tl.float32, BLOCK_C=BLOCK_C, BLOCK_DOT=BLOCK_DOT,
        BLOCK_B=max(FUSED_TILE // block_k, 16), BLOCK_K=block_k,
        BLOCK_ROW=min(max(triton.next_power_of_2(features), 16), FUSED_TILE // BLOCK_C),
        GUARD=guard, HAS_OK=ok is not None,
        # one stage: software-pipelined dot loops held 255 registers and spilled on sm_90 (bf16, K = 100);
        # unpipelined, 8 warps: 169 registers, no spill (4 warps: 236)
        num_warps=8, num_stages=1,
    )
