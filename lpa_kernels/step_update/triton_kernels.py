"""Triton kernels of the fused per-step ops (``naive.py`` defines what they compute), one launch each.

``_checked_label_plan_kernel``: one program. It reads the labels once for their range (``ok``, the
bad-range record), once to write the clamped and loss labels, then per block of BLOCK_K classes twice:
a one-hot count of each class (whose running exclusive sum gives ``starts``, and over the classes
present the segment index), then each sample's place in the stable class order: its class's start,
plus the samples of that class in earlier blocks, plus its rank in its block (a cumulative sum of the
one-hot tile down the samples). A counting sort without atomics: the plan is the same on every run.
Its work grows with B x K; for large class counts (``step_update.plan``: above ``ONE_LAUNCH_PLAN_MAX``, B
at most ``SORTED_PLAN_MAX_B``) the plan is sorted instead, in two launches:
``_sorted_label_plan_kernel``, one program, checks and clamps the labels as above, then sorts the keys
``label * B + sample`` (distinct, so their order is the stable class order: the order is ``key % B``),
marks the first sample of each class in the sorted labels (their left neighbour, read back from memory,
differs) and numbers those with a cumulative sum (the segments); ``_class_starts_kernel``, one program
per block of classes, finds ``starts[c]``, the number of sorted labels below ``c``, by binary search.
``_class_stats_kernel``: one program per block of classes sums the one-hot tile of each block of
samples (``where``, not a product, so a non-finite sample reaches only its own class).
``_policy_kernel``: one program walks the classes in blocks: the means and their sums (the confidence
threshold) and the trend update; after a barrier, the largest gaps and the trend's mean fall; then
direction and radius.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import new_output, poisoning
from lpa_kernels.step_update.naive import DIRECTIONS, IGNORE_LABEL, RADII

BLOCK_K = 128  # classes per tile at most (label plan, class statistics)
TILE = 2048  # (samples x classes) per one-hot tile: with few classes a tile takes more samples
BLOCK_POLICY = 256  # classes per block of the policy's walk
# the largest int64: the neutral element of the range's min (and, negated minus one, the smallest, of its max), so
# that the record of a bad batch is exact for every label; also the sorted plan's padding key
LABEL_BOUND = 2**63 - 1


@triton.jit
def _safe_labels(labels_ptr, b, B, K):
    """The labels ``b`` (those below B) clamped into ``[0, K)``, as int64."""
    return tl.minimum(tl.maximum(tl.load(labels_ptr + b, mask=b < B, other=0).to(tl.int64), 0), K - 1)


@triton.jit
def _record_verdict(ok_ptr, bad_range_ptr, lowest, highest, K):
    """``ok`` (every label in ``[0, K)``: True for an empty batch), stored, and for a bad batch its label range
    ``(lowest, highest)`` into the record; returns ``ok``."""
    ok = (lowest >= 0) & (highest < K)
    tl.store(ok_ptr, ok)
    tl.store(bad_range_ptr, tl.where(ok, tl.load(bad_range_ptr), lowest))
    tl.store(bad_range_ptr + 1, tl.where(ok, tl.load(bad_range_ptr + 1), highest))
    return ok


@triton.jit
def _pad_segments(segment_class_ptr, segment_start_ptr, segments, B, K, S, BLOCK: tl.constexpr):
    """The plan's segments past the ``segments`` classes present: class K, no samples (start B)."""
    for s0 in range(0, S + 1, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        padding = s >= segments
        tl.store(segment_class_ptr + s, tl.full((BLOCK,), 0, tl.int64) + K, mask=padding & (s < S))
        tl.store(segment_start_ptr + s, tl.full((BLOCK,), 0, tl.int64) + B, mask=padding & (s <= S))


@triton.jit
def _checked_label_plan_kernel(
    labels_ptr, safe_ptr, loss_labels_ptr, ok_ptr, bad_range_ptr, plan_ptr, B, K, S,
    IGNORE: tl.constexpr, BOUND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    lo = tl.full((BLOCK_B,), BOUND, tl.int64)
    hi = tl.full((BLOCK_B,), -BOUND - 1, tl.int64)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        y = tl.load(labels_ptr + b, mask=b < B, other=0).to(tl.int64)
        lo = tl.minimum(lo, tl.where(b < B, y, BOUND))
        hi = tl.maximum(hi, tl.where(b < B, y, -BOUND - 1))
    ok = _record_verdict(ok_ptr, bad_range_ptr, tl.min(lo, axis=0), tl.max(hi, axis=0), K)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        y = _safe_labels(labels_ptr, b, B, K)
        tl.store(safe_ptr + b, y, mask=b < B)
        tl.store(loss_labels_ptr + b, tl.where(ok, y, IGNORE), mask=b < B)
    # plan = [order (B) | starts (K + 1) | segment_class (S) | segment_start (S + 1)]
    starts_ptr = plan_ptr + B
    segment_class_ptr = starts_ptr + K + 1
    segment_start_ptr = segment_class_ptr + S
    placed = tl.zeros((), tl.int64)  # samples of the classes before this block
    segments = tl.zeros((), tl.int64)  # classes present before this block
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        counts = tl.zeros((BLOCK_K,), tl.int32)
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            y = _safe_labels(labels_ptr, b, B, K)
            hit = (y[:, None] == k[None, :]) & (b < B)[:, None]
            counts += tl.sum(hit.to(tl.int32), axis=0)
        starts = placed + tl.cumsum(counts, axis=0) - counts
        tl.store(starts_ptr + k, starts, mask=k < K)
        present = (counts > 0).to(tl.int64)
        segment = segments + tl.cumsum(present, axis=0) - present
        tl.store(segment_class_ptr + segment, k.to(tl.int64), mask=(present > 0) & (k < K))
        tl.store(segment_start_ptr + segment, starts, mask=(present > 0) & (k < K))
        earlier = tl.zeros((BLOCK_K,), tl.int32)  # samples of each class in earlier sample tiles
        for b0 in range(0, B, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            y = _safe_labels(labels_ptr, b, B, K)
            hit = (y[:, None] == k[None, :]) & (b < B)[:, None]
            rank = tl.cumsum(hit.to(tl.int32), axis=0)  # inclusive: 1 for the tile's first sample of c
            place = starts[None, :] + earlier[None, :] + rank - 1
            tl.store(plan_ptr + place, (b[:, None] + 0 * k[None, :]).to(tl.int64), mask=hit)
            earlier += tl.sum(hit.to(tl.int32), axis=0)
        placed += tl.sum(counts, axis=0)
        segments += tl.sum(present, axis=0)
    tl.store(starts_ptr + K, placed)
    _pad_segments(segment_class_ptr, segment_start_ptr, segments, B, K, S, BLOCK_K)


@triton.jit
def _sorted_label_plan_kernel(
    labels_ptr, safe_ptr, loss_labels_ptr, ok_ptr, bad_range_ptr, plan_ptr, sorted_ptr, B, K, S,
    IGNORE: tl.constexpr, BOUND: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.arange(0, BLOCK)
    valid = b < B
    y = tl.load(labels_ptr + b, mask=valid, other=0).to(tl.int64)
    ok = _record_verdict(ok_ptr, bad_range_ptr, tl.min(tl.where(valid, y, BOUND), axis=0),
                         tl.max(tl.where(valid, y, -BOUND - 1), axis=0), K)
    safe = tl.minimum(tl.maximum(y, 0), K - 1)
    tl.store(safe_ptr + b, safe, mask=valid)
    tl.store(loss_labels_ptr + b, tl.where(ok, safe, IGNORE), mask=valid)
    # plan = [order (B) | starts (K + 1, _class_starts_kernel) | segment_class (S) | segment_start (S + 1)]
    keys = tl.sort(tl.where(valid, safe * B + b, BOUND))  # the padding lanes' keys sort last
    sorted_labels = keys // B
    tl.store(plan_ptr + b, keys - sorted_labels * B, mask=valid)
    tl.store(sorted_ptr + b, sorted_labels, mask=valid)
    tl.debug_barrier()  # each lane reads its left neighbour's sorted label, which another thread wrote
    previous = tl.load(sorted_ptr + b - 1, mask=valid & (b > 0), other=-1)
    first = valid & (sorted_labels != previous)  # the first sample of each class present
    segment = tl.cumsum(first.to(tl.int32), axis=0) - 1
    segments = tl.sum(first.to(tl.int32), axis=0)
    segment_class_ptr = plan_ptr + B + K + 1
    segment_start_ptr = segment_class_ptr + S
    tl.store(segment_class_ptr + segment, sorted_labels, mask=first)
    tl.store(segment_start_ptr + segment, b.to(tl.int64), mask=first)
    _pad_segments(segment_class_ptr, segment_start_ptr, segments, B, K, S, BLOCK)


@triton.jit
def _class_starts_kernel(sorted_ptr, plan_ptr, B, K, halvings, BLOCK_K: tl.constexpr):
    """``starts[c]`` (the plan's, after its B entries of order) for this program's classes ``c <= K``: the
    number of sorted labels below ``c``, by a binary search of ``halvings`` (B's bit length) steps."""
    c = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    lo = tl.zeros((BLOCK_K,), tl.int64)
    hi = tl.zeros((BLOCK_K,), tl.int64) + B
    for _ in range(halvings):
        searching = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(sorted_ptr + mid, mask=searching, other=0) < c
        lo = tl.where(searching & below, mid + 1, lo)
        hi = tl.where(searching & ~below, mid, hi)
    tl.store(plan_ptr + B + c, lo, mask=c <= K)


@triton.jit
def _class_stats_kernel(
    stats_ptr, log_probs_ptr, labels_ptr, ok_ptr, B, K, row_stride,
    ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    counts = tl.zeros((BLOCK_K,), ACC)
    p_sums = tl.zeros((BLOCK_K,), ACC)
    ce_sums = tl.zeros((BLOCK_K,), ACC)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        y = tl.load(labels_ptr + b, mask=b < B, other=-1).to(tl.int64)
        log_p = tl.load(log_probs_ptr + b.to(tl.int64) * row_stride + y, mask=b < B, other=0).to(ACC)
        hit = (y[:, None] == k[None, :]) & (b < B)[:, None]
        counts += tl.sum(hit.to(ACC), axis=0)
        p_sums += tl.sum(tl.where(hit, tl.exp(log_p)[:, None], 0), axis=0)
        ce_sums += tl.sum(tl.where(hit, -log_p[:, None], 0), axis=0)
    ok = tl.load(ok_ptr) != 0
    counts, p_sums, ce_sums = tl.where(ok, counts, 0), tl.where(ok, p_sums, 0), tl.where(ok, ce_sums, 0)
    mask = k < K
    if ACCUMULATE:
        counts += tl.load(stats_ptr + k, mask=mask, other=0)
        p_sums += tl.load(stats_ptr + K + k, mask=mask, other=0)
        ce_sums += tl.load(stats_ptr + 2 * K + k, mask=mask, other=0)
    tl.store(stats_ptr + k, counts, mask=mask)
    tl.store(stats_ptr + K + k, p_sums, mask=mask)
    tl.store(stats_ptr + 2 * K + k, ce_sums, mask=mask)


@triton.jit
def _means(stats_ptr, k, K, ACC: tl.constexpr):
    """``(counts, finite, present, mean p_true, mean CE)`` of classes ``k`` (``naive.class_means``)."""
    mask = k < K
    counts = tl.load(stats_ptr + k, mask=mask, other=0).to(ACC)
    p_sum = tl.load(stats_ptr + K + k, mask=mask, other=0).to(ACC)
    ce_sum = tl.load(stats_ptr + 2 * K + k, mask=mask, other=0).to(ACC)
    finite = (tl.abs(p_sum) < float("inf")) & (tl.abs(ce_sum) < float("inf"))  # False for NaN too
    samples = tl.maximum(counts, 1)
    present = (counts > 0) & finite
    return counts, finite, present, tl.where(finite, p_sum / samples, 0), tl.where(finite, ce_sum / samples, 0)


@triton.jit
def _divisor(largest):
    return tl.where(largest > 0, largest, 1)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _policy_kernel(
    stats_ptr, fixed_direction_ptr, fixed_eps_ptr, loss_ema_ptr, fall_ema_ptr, skipped_ptr, params_ptr,
    direction_ptr, eps_ptr, K,
    DIRECTION: tl.constexpr, RADIUS: tl.constexpr, OBSERVE: tl.constexpr, CLEAR: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    eps = tl.load(params_ptr).to(ACC)
    delta_eps = tl.load(params_ptr + 1).to(ACC)
    min_radius = tl.load(params_ptr + 2).to(ACC)
    momentum = tl.load(params_ptr + 3)  # float64, as the trend state
    GAP: tl.constexpr = DIRECTION == 1 or RADIUS != 0
    TREND: tl.constexpr = DIRECTION == 2
    # pass 1: the confidence threshold's sums; the trend update
    p_total = tl.zeros((BLOCK,), ACC)
    present_total = tl.zeros((BLOCK,), ACC)
    rejected = tl.zeros((BLOCK,), tl.int64)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        counts, finite, present, p_c, loss = _means(stats_ptr, k, K, ACC)
        p_total += tl.where(present, p_c, 0)
        present_total += present.to(ACC)
        if OBSERVE:
            loss64 = loss.to(tl.float64)  # the mean in the statistics' precision, as the reference
            rejected += ((counts > 0) & (finite == 0)).to(tl.int64)
            ema = tl.load(loss_ema_ptr + k, mask=k < K, other=0)
            fall = tl.load(fall_ema_ptr + k, mask=k < K, other=0)
            first = present & (ema != ema)
            seen = present & (ema == ema)
            updated = momentum * ema + (1 - momentum) * loss64
            tl.store(fall_ema_ptr + k, tl.where(seen, momentum * fall + (1 - momentum) * (ema - updated), fall),
                     mask=k < K)
            tl.store(loss_ema_ptr + k, tl.where(seen, updated, tl.where(first, loss64, ema)), mask=k < K)
    if OBSERVE:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.sum(rejected, axis=0))
    thr = tl.sum(p_total, axis=0) / tl.maximum(tl.sum(present_total, axis=0), 1)
    tl.debug_barrier()  # the trend state written above is read below by other threads
    # pass 2: the largest gap on each side of thr; the trend's mean fall over the classes seen
    above_max = tl.zeros((BLOCK,), ACC)
    below_max = tl.zeros((BLOCK,), ACC)
    fall_total = tl.zeros((BLOCK,), tl.float64)
    seen_total = tl.zeros((BLOCK,), tl.float64)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        if GAP:
            _, _, present, p_c, _ = _means(stats_ptr, k, K, ACC)
            gap = tl.where(present, thr - p_c, 0)
            above_max = tl.maximum(above_max, tl.maximum(gap, 0))
            below_max = tl.maximum(below_max, tl.maximum(-gap, 0))
        if TREND:
            ema = tl.load(loss_ema_ptr + k, mask=k < K, other=float("nan"))
            fall_total += tl.load(fall_ema_ptr + k, mask=k < K, other=0)
            seen_total += (ema == ema).to(tl.float64)
    # the largest gaps as divisors: 1 where 0 (every gap is then 0, and so is each quotient)
    above_max, below_max = _divisor(tl.max(above_max, axis=0)), _divisor(tl.max(below_max, axis=0))
    largest = tl.maximum(above_max, below_max)
    mean_fall = tl.sum(fall_total, axis=0) / tl.maximum(tl.sum(seen_total, axis=0), 1)  # unread when none seen
    # pass 3: direction and radius
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < K
        gap = tl.zeros((BLOCK,), ACC)
        if GAP:
            _, _, present, p_c, _ = _means(stats_ptr, k, K, ACC)
            gap = tl.where(present, thr - p_c, 0)
        if DIRECTION == 0:
            direction = tl.load(fixed_direction_ptr + k, mask=mask, other=0).to(ACC)
        elif DIRECTION == 1:
            direction = _sign(gap).to(ACC)
        else:
            ema = tl.load(loss_ema_ptr + k, mask=mask, other=0)
            fall = tl.load(fall_ema_ptr + k, mask=mask, other=0)
            direction = tl.where(ema == ema, _sign(mean_fall - fall), 0.0).to(ACC)
        if RADIUS == 0:
            radius = tl.load(fixed_eps_ptr + k, mask=mask, other=1).to(ACC)
        elif RADIUS == 1:
            above, below = tl.maximum(gap, 0) / above_max, tl.maximum(-gap, 0) / below_max
            radius = tl.maximum(eps * (1 + delta_eps * (above + below)), min_radius)
        else:
            radius = tl.maximum(eps * (tl.abs(gap) / largest), min_radius)
        tl.store(direction_ptr + k, direction, mask=mask)
        tl.store(eps_ptr + k, radius, mask=mask)
        if CLEAR:
            zero = tl.zeros((BLOCK,), stats_ptr.dtype.element_ty)
            tl.store(stats_ptr + k, zero, mask=mask)
            tl.store(stats_ptr + K + k, zero, mask=mask)
            tl.store(stats_ptr + 2 * K + k, zero, mask=mask)


# launched on a grid of one program (the GPU compile check finds kernels by their program id otherwise)
SINGLE_PROGRAM_KERNELS = (_checked_label_plan_kernel, _sorted_label_plan_kernel, _policy_kernel)


def _index_output(size: int, device: torch.device) -> torch.Tensor:
    """An int64 output the kernel fully overwrites (filled with -7, no valid index, when poisoning)."""
    return torch.full((size,), -7, dtype=torch.int64, device=device) if poisoning() else torch.empty(
        (size,), dtype=torch.int64, device=device)


def _tiling(num_classes: int) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_K)`` of the one-hot tiles for ``num_classes`` classes."""
    block_k = min(triton.next_power_of_2(num_classes), BLOCK_K)
    return TILE // block_k, block_k


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


# The label plan's tiles and warps: _tiling's few-class tiles are long in B (128 x 16 at K = 10), which at
# 4 warps took 96 registers and spilled on sm_80; at most 64 samples (at least 256 elements: K <= 2 takes 128
# or 256) over 8 warps compile without spills on sm_90a and sm_80 for K = 1 .. 1000 (32-61 registers), with
# few tile steps still (B / 64 per pass at K <= 32; 16-sample tiles, also spill-free, took 4 times as many).
PLAN_BLOCK_B, PLAN_MIN_TILE, PLAN_WARPS = 64, 256, 8


# The sorted plan's class blocks (binary searches) per program.
STARTS_BLOCK_K = 1024


def checked_label_plan(labels, num_classes, bad_range, sort):
    """``StepLaunchers.checked_label_plan``."""
    B = labels.numel()
    segments = min(B, num_classes)
    safe, loss_labels = _index_output(B, labels.device), _index_output(B, labels.device)
    ok = torch.empty((), dtype=torch.bool, device=labels.device)
    plan = _index_output(B + num_classes + 2 * segments + 2, labels.device)
    if sort:
        sorted_labels = torch.empty(B, dtype=torch.int64, device=labels.device)  # scratch
        _sorted_label_plan_kernel[(1,)](
            labels, safe, loss_labels, ok, bad_range, plan, sorted_labels, B, num_classes, segments,
            IGNORE=IGNORE_LABEL, BOUND=LABEL_BOUND, BLOCK=max(triton.next_power_of_2(B), 16), num_warps=PLAN_WARPS,
        )
        _class_starts_kernel[(triton.cdiv(num_classes + 1, STARTS_BLOCK_K),)](
            sorted_labels, plan, B, num_classes, B.bit_length(), BLOCK_K=STARTS_BLOCK_K,
        )
        return safe, loss_labels, ok, plan
    block_b, block_k = _tiling(num_classes)
    block_b = min(block_b, max(PLAN_BLOCK_B, PLAN_MIN_TILE // block_k))
    _checked_label_plan_kernel[(1,)](
        labels, safe, loss_labels, ok, bad_range, plan, B, num_classes, segments,
        IGNORE=IGNORE_LABEL, BOUND=LABEL_BOUND, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=PLAN_WARPS,
    )
    return safe, loss_labels, ok, plan


def class_stats(stats, log_probs, labels, ok, accumulate):
    """``StepLaunchers.class_stats``."""
    B, K = log_probs.shape
    block_b, block_k = _tiling(K)
    _class_stats_kernel[(triton.cdiv(K, block_k),)](
        stats, log_probs, labels, ok, B, K, log_probs.stride(0),
        ACCUMULATE=accumulate, ACC=_acc(stats.dtype), BLOCK_B=block_b, BLOCK_K=block_k,
    )


def policy(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction, radius, observe, clear,
           dtype):
    """``StepLaunchers.policy``."""
    K = stats.shape[1]
    out_direction, out_eps = new_output((K,), dtype, stats.device), new_output((K,), dtype, stats.device)
    stand_in = stats  # unread pointer arguments (the constexpr choices keep them unread)
    _policy_kernel[(1,)](
        stats, stand_in if fixed_direction is None else fixed_direction, stand_in if fixed_eps is None else fixed_eps,
        stand_in if loss_ema is None else loss_ema, stand_in if fall_ema is None else fall_ema,
        stand_in if skipped is None else skipped, params, out_direction, out_eps, K,
        DIRECTION=DIRECTIONS[direction], RADIUS=RADII[radius], OBSERVE=observe, CLEAR=clear, ACC=_acc(dtype),
        BLOCK=min(triton.next_power_of_2(max(K, 1)), BLOCK_POLICY),
    )
    return out_direction, out_eps

