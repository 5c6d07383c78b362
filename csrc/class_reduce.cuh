// The deterministic per-class segmented reduction shared by the perturb backward, class_grad + PGD
// and the linear_perturb backward epilogue.
//
// A sample of F features is split into D groups: feature f = (o * D + k) * inner + i belongs to group
// k, with o < outer and i < inner (full layout: D = F; channel-wise NCHW: D = C, inner = H * W;
// last-dim: inner = 1, outer = F / D). The samples arrive ordered by class (`order`, a stable argsort
// of the labels) with `offsets[c]..offsets[c + 1]` the samples of class c, so class c's group k is a
// fixed list of elements and its sum is taken in a fixed order: no atomics, bitwise reproducible.
//
// Thread layout of a block (TX * TY = 256 threads): `threadIdx.x` picks the group k (TX consecutive
// groups, so with inner == 1 neighbouring threads read neighbouring addresses), `threadIdx.y` strides
// over the (sample, o, i) elements of that group with i fastest (so with inner > 1 and TX == 1 the
// block reads contiguous runs). Each thread keeps its own partial sums; the TY partials of a group are
// then added in a fixed tree order.
#pragma once

#include "common.cuh"

namespace lpa {

constexpr int kReduceThreads = 256;

struct GroupShape {
  int64_t F;      // features per sample
  int64_t D;      // groups (delta entries per class)
  int64_t inner;  // contiguous features per group run
  int64_t outer;  // runs per group per sample: F / (D * inner)
};

// (TX, TY) for a shape: TX consecutive groups when their features are adjacent (inner == 1).
inline dim3 reduce_block(const GroupShape& s) {
  int tx = 1;
  if (s.inner == 1) {
    while (tx < 32 && tx < s.D) tx *= 2;
  }
  return dim3(tx, kReduceThreads / tx);
}

// Per-thread sums over the elements of group k for the samples order[row_begin..row_end), calling
// `op.element(index, class_state, sum1, sum2)` on each element index of the (B, F) tensors.
template <typename A, class Op>
__device__ void group_partial_sums(const Op& op, int64_t c, int64_t k, const int64_t* order, int64_t row_begin,
                                   int64_t row_end, const GroupShape& s, A& sum1, A& sum2) {
  const int64_t per_sample = s.outer * s.inner;
  const int64_t ty = threadIdx.y, ny = blockDim.y;
  // Position (r, o, i) of this thread's first element and the mixed-radix stride of ny elements.
  int64_t r = row_begin + ty / per_sample;
  int64_t o = (ty % per_sample) / s.inner, i = ty % s.inner;
  const int64_t dr = ny / per_sample, d_o = (ny % per_sample) / s.inner, di = ny % s.inner;
  const auto state = op.class_state(c, k);
  while (r < row_end) {
    const int64_t sample = order[r];
    op.element(sample * s.F + (o * s.D + k) * s.inner + i, state, sum1, sum2);
    i += di;
    if (i >= s.inner) { i -= s.inner; ++o; }
    o += d_o;
    if (o >= s.outer) { o -= s.outer; ++r; }
    r += dr;
  }
}

// Adds the TY partial sums of each group in a fixed tree order; row threadIdx.y == 0 gets the totals.
template <typename A>
__device__ A reduce_over_y(A value, A* scratch) {
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x;
  scratch[ty * nx + tx] = value;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (ty < half) scratch[ty * nx + tx] += scratch[(ty + half) * nx + tx];
    __syncthreads();
  }
  A total = scratch[tx];
  __syncthreads();
  return total;
}

// Block (group tile blockIdx.x, class blockIdx.y, sample split blockIdx.z): the partial sums of
// class c over its split-th share of samples, written to part1/part2[(split, c, k)] (part2 may be null).
template <typename A, class Op>
__global__ void __launch_bounds__(kReduceThreads)
class_reduce_kernel(Op op, const int64_t* order, const int64_t* offsets, GroupShape s, int64_t num_classes,
                    A* part1, A* part2) {
  __shared__ A scratch[kReduceThreads];
  const int64_t c = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = offsets[c], count = offsets[c + 1] - first;
  const int64_t share = (count + splits - 1) / splits;
  const int64_t row_begin = first + min64(count, split * share), row_end = first + min64(count, (split + 1) * share);
  A sum1 = 0, sum2 = 0;
  if (k < s.D) group_partial_sums(op, c, k, order, row_begin, row_end, s, sum1, sum2);
  sum1 = reduce_over_y(sum1, scratch);
  if (part2 != nullptr) sum2 = reduce_over_y(sum2, scratch);
  if (threadIdx.y == 0 && k < s.D) {
    const int64_t at = (split * num_classes + c) * s.D + k;
    part1[at] = sum1;
    if (part2 != nullptr) part2[at] = sum2;
  }
}

// out[j] = sum over i < n_outer of part[i * n_inner + j], in order of i (rounded once to T).
template <typename T, typename A>
__global__ void sum_partials_kernel(const A* part, int64_t n_outer, int64_t n_inner, T* out) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n_inner; j += int64_t(gridDim.x) * blockDim.x) {
    A total = 0;
    for (int64_t i = 0; i < n_outer; ++i) total += part[i * n_inner + j];
    out[j] = store_from<T>(total);
  }
}

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);
}

void check_class_grid(const GroupShape& s, int64_t num_classes, int64_t splits, const char* kernel);

}  // namespace lpa
