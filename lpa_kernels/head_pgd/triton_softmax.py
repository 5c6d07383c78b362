"""The Triton softmax pieces shared by ``head_pgd_``'s kernels (``triton_kernels.py``, ``triton_fused.py``).

``_softmax_stats``: each row's softmax pivot and ``1 / sum`` in one online pass over K in tiles of
``BLOCK_K`` (a running row maximum, the sum of ``exp(z - max)`` rescaled whenever the maximum grows).

``_softmax_class_sum`` (the class-space form's step): ``sums[c] = sum_{y_b = c} softmax(logits[b] +
shift[c]) - onehot(c)`` for one class, walking its samples in the label plan's order
(``order[starts[c]:starts[c + 1]]``) in tiles of ``BLOCK_B``. Phase 1 computes each sample's pivot and
``1 / sum`` into a ``(2, B)`` scratch, and the true class's probability; phase 2, for each ``BLOCK_K``
columns, sums the probabilities over the class's samples (a ``(BLOCK_B, BLOCK_K)`` accumulator reduced
once, so the order is fixed) and writes them minus the class's sample count on the diagonal. The row is
always written (an absent class: 0), so no zero fill, no ``(B, K)`` probabilities and no separate class
reduction. Arithmetic in float32 (float64 for float64 data).
"""

import triton
import triton.language as tl

# Elements of one (BLOCK_B, BLOCK_K) tile: 16 float32 registers per thread at 4 warps.
TILE = 2048


# What _logits_tile adds to the logits: nothing, one row shift[cols] for every sample (shift_row a
# pointer), or each sample's own row (shift_row a (BLOCK_B,) tensor of row pointers).
NO_SHIFT, SHARED_SHIFT, ROW_SHIFT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _logits_tile(logits_ptr, shift_row, rows, cols, row_ok, K, SHIFT: tl.constexpr, ACC: tl.constexpr):
    """The ``(BLOCK_B, BLOCK_K)`` tile ``logits[rows, cols]`` plus the ``SHIFT`` in ACC; -inf outside the
    rows and K."""
    mask = row_ok[:, None] & (cols < K)[None, :]
    z = tl.load(logits_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
    if SHIFT == SHARED_SHIFT:
        z += tl.load(shift_row + cols, mask=cols < K, other=0.0).to(ACC)[None, :]
    if SHIFT == ROW_SHIFT:
        z += tl.load(shift_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    return z


@triton.jit
def _softmax_stats(logits_ptr, shift_row, rows, row_ok, K, SHIFT: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(pivot, 1 / sum)`` of each row's softmax, ``softmax = exp(z - pivot) / sum``, in one online pass
    over K; padded rows get ``1 / sum = 1`` (and a pivot of 0)."""
    row_max = tl.full((BLOCK_B,), float("-inf"), ACC)
    row_sum = tl.zeros((BLOCK_B,), ACC)
    for k0 in range(0, K, BLOCK_K):
        z = _logits_tile(logits_ptr, shift_row, rows, k0 + tl.arange(0, BLOCK_K), row_ok, K, SHIFT, ACC)
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        # A row with no finite logit yet keeps max -inf: subtract 0 instead (exp(-inf) = 0 either way),
        # never -inf - -inf = NaN. A NaN logit makes the row's sum, and so the row, NaN.
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - pivot) + tl.sum(tl.exp(z - pivot[:, None]), axis=1)
        row_max = new_max
    return tl.where(row_max == float("-inf"), 0.0, row_max), 1.0 / tl.where(row_ok, row_sum, 1.0)



@triton.jit
def _softmax_class_sum(c, sums_ptr, p_true_ptr, scratch_ptr, logits_ptr, shift_ptr, order_ptr, starts_ptr, B, K,
                       WRITE_P_TRUE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Class ``c``'s row of ``sums``: ``sum_{y_b = c} softmax(logits[b] + shift[c]) - onehot(c)`` (module docstring)."""
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
    # Phase 2: the class's probabilities summed column block by column block, minus its count on the diagonal.
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
        tl.store(sums_ptr + c.to(tl.int64) * K + cols, sums.to(sums_ptr.dtype.element_ty), mask=cols < K)
