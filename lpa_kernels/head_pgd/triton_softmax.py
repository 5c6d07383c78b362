"""The Triton softmax pieces shared by ``head_pgd_``'s kernels (``triton_kernels.py``, ``triton_fused.py``).

``_softmax_stats``: each row's softmax pivot and ``1 / sum`` in one online pass over K in tiles of
``BLOCK_K`` (a running row maximum, the sum of ``exp(z - max)`` rescaled whenever the maximum grows).

``class_sum_scale``: the power of two a class's class-space sums are scaled by.

``_logits_tile``: a ``(BLOCK_B, BLOCK_K)`` tile of logits plus a shift: none, one row for every sample
(the launch-per-phase class-space kernel: one program per class), or each sample's own row (the fused
kernel: a block of classes). Arithmetic in float32 (float64 for float64 data).
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
def class_sum_scale(count):
    """The class-space sums' per-class scale in float16 (``loop.HeadKernels.softmax_class_sum``): ``1 /
    2^floor(log2 count)`` (1 for a count below 2), exactly, from float32 exponent bits: a class's sums lie
    in [-2, 2] and stay finite whatever its sample count. ``count``: a float32 or integer tensor."""
    bits = tl.maximum(count, 1).to(tl.float32).to(tl.int32, bitcast=True)
    return ((254 - ((bits >> 23) & 0xFF)) << 23).to(tl.float32, bitcast=True)


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
