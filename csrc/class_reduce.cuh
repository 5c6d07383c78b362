// The deterministic per-class segmented reduction shared by the perturb backward, class_grad + PGD
// and the linear_perturb backward epilogue.
//
// A sample of F features is split into D groups: feature f = (o * D + k) * inner + i belongs to group
// k, with o < outer and i < inner (full layout: D = F; channel-wise NCHW: D = C, inner = H * W;
// last-dim: inner = 1, outer = F / D). The samples arrive ordered by class (`order`, a stable argsort
// of the labels) with `offsets[c]..offsets[c + 1]` the samples of class c, so class c's group k is a
// fixed list of elements and its sum is taken in a fixed order: no atomics, bitwise reproducible.
//
// Grid: class c along x, group tile along y, sample split along z. Classes go on x because only x may
// exceed 65535 blocks (up to 2^31 - 1): an LLM-vocabulary head has K = 100,000 classes
// (dispatch_class_reduce refuses more than 65535 tiles or splits).
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

// (TX, TY) for a shape whose threads read V elements at a time. inner == 1: each thread owns V
// consecutive groups, TX neighbouring threads on neighbouring groups. inner > 1: the V elements are
// consecutive features of one group's run, and TY threads (a warp at least) walk a group's runs,
// about one thread per V features of a run, so that a block covers several groups of a short run
// (14 x 14 channels) instead of leaving most threads one or two elements each.
inline dim3 reduce_block(const GroupShape& s, int V = 1) {
  int tx = 1;
  if (s.inner == 1) {
    while (tx < 32 && int64_t(tx) * V < s.D) tx *= 2;
  } else {
    while (tx < kReduceThreads / 32 && int64_t(kReduceThreads / (2 * tx)) * V >= s.inner) tx *= 2;
  }
  return dim3(tx, kReduceThreads / tx);
}

// V elements at idx, with one load when V > 1 (callers guarantee 16-byte alignment then).
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p, int64_t idx) { return *reinterpret_cast<const Vec<T, V>*>(p + idx); }
template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t idx, const Vec<T, V>& v) { *reinterpret_cast<Vec<T, V>*>(p + idx) = v; }

// Per-thread sums for the samples order[row_begin..row_end), calling
// `op.element<V>(index, class_state, sum1, sum2)` on each V-element index of the (B, F) tensors.
// RUN == false: the V lanes are the groups k .. k + V - 1 (inner == 1, so their elements are adjacent).
// RUN == true: the V lanes are V consecutive features of group k's runs (inner % V == 0), each lane
// summed on its own; the caller adds the lanes.
template <int V, bool RUN, typename A, class Op>
__device__ void group_partial_sums(const Op& op, int64_t c, int64_t k, const int64_t* order, int64_t row_begin,
                                   int64_t row_end, const GroupShape& s, A (&sum1)[V], A (&sum2)[V]) {
  const int64_t run = RUN ? s.inner / V : s.inner;  // steps per run
  const int64_t per_sample = s.outer * run;
  const int64_t ty = threadIdx.y, ny = blockDim.y;
  // Position (r, o, i) of this thread's first step and the mixed-radix stride of ny steps.
  int64_t r = row_begin + ty / per_sample;
  int64_t o = (ty % per_sample) / run, i = ty % run;
  const int64_t dr = ny / per_sample, d_o = (ny % per_sample) / run, di = ny % run;
  A state[V];
#pragma unroll
  for (int j = 0; j < V; ++j) state[j] = op.class_state(c, RUN ? k : k + j);
  while (r < row_end) {
    const int64_t sample = order[r];
    op.template element<V>(sample * s.F + (o * s.D + k) * s.inner + (RUN ? i * V : i), state, sum1, sum2);
    i += di;
    if (i >= run) { i -= run; ++o; }
    o += d_o;
    if (o >= s.outer) { o -= s.outer; ++r; }
    r += dr;
  }
}

// Adds the TY partial sums of each group in a fixed tree order (all V lanes in one pass over
// `scratch`, V * TX * TY slots); every thread gets its groups' totals back in `value`.
template <int V, typename A>
__device__ void reduce_over_y(A (&value)[V], A* scratch) {
  const int tx = threadIdx.x, ty = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
#pragma unroll
  for (int j = 0; j < V; ++j) scratch[(j * ny + ty) * nx + tx] = value[j];
  __syncthreads();
  for (int half = ny / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int j = 0; j < V; ++j) scratch[(j * ny + ty) * nx + tx] += scratch[(j * ny + ty + half) * nx + tx];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) value[j] = scratch[j * ny * nx + tx];
  __syncthreads();
}

// Block (class blockIdx.x, group tile blockIdx.y, sample split blockIdx.z): the partial sums of
// class c over its split-th share of samples, written to part1/part2[(split, c, k)] (part2 may be
// null). Each thread reads V elements at a time (V > 1: 16-byte loads): V consecutive groups
// (RUN == false, D % V == 0) or V consecutive features of one group (RUN == true, inner % V == 0).
// `scratch` holds kReduceThreads * (RUN ? 1 : V) accumulators in shared memory.
template <int V, bool RUN, typename A, class Op>
__device__ void block_class_partials(const Op& op, const int64_t* order, const int64_t* offsets, const GroupShape& s,
                                     int64_t num_classes, A* part1, A* part2, A* scratch) {
  constexpr int G = RUN ? 1 : V;  // groups per thread
  const int64_t c = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
  const int64_t k = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * G;
  const int64_t first = offsets[c], count = offsets[c + 1] - first;
  const int64_t share = (count + splits - 1) / splits;
  const int64_t row_begin = first + min64(count, split * share), row_end = first + min64(count, (split + 1) * share);
  A lanes1[V] = {}, lanes2[V] = {};
  if (k < s.D) group_partial_sums<V, RUN>(op, c, k, order, row_begin, row_end, s, lanes1, lanes2);
  A sum1[G], sum2[G];
#pragma unroll
  for (int j = 0; j < G; ++j) sum1[j] = lanes1[j], sum2[j] = lanes2[j];
  if constexpr (RUN) {  // the lanes of one group, added in lane order
#pragma unroll
    for (int j = 1; j < V; ++j) sum1[0] += lanes1[j], sum2[0] += lanes2[j];
  }
  reduce_over_y(sum1, scratch);
  if (part2 != nullptr) reduce_over_y(sum2, scratch);
  if (threadIdx.y == 0 && k < s.D) {
    const int64_t at = (split * num_classes + c) * s.D + k;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      part1[at + j] = sum1[j];
      if (part2 != nullptr) part2[at + j] = sum2[j];
    }
  }
}

template <int V, bool RUN, typename A, class Op>
__global__ void __launch_bounds__(kReduceThreads)
class_reduce_kernel(Op op, const int64_t* order, const int64_t* offsets, GroupShape s, int64_t num_classes,
                    A* part1, A* part2) {
  __shared__ A scratch[kReduceThreads * (RUN ? 1 : V)];
  block_class_partials<V, RUN>(op, order, offsets, s, num_classes, part1, part2, scratch);
}

// The load width a block_class_partials launch was compiled for (its V and RUN template arguments).
template <int V_, bool RUN_>
struct ReduceWidth {
  static constexpr int V = V_;
  static constexpr bool RUN = RUN_;
};

// Calls launch(ReduceWidth<V, RUN>{}, grid, block) for the (class, group tile, sample split) grid of
// block_class_partials over a T tensor: V = kVec<T> (16-byte loads) when the shape and every pointer
// (`aligned`) allow it, else V = 1, one element per thread.
// Throws std::invalid_argument naming `kernel`, before launching, when the grid exceeds CUDA's limits.
template <typename T, class Launch>
void dispatch_class_reduce(const char* kernel, bool aligned, const GroupShape& s, int64_t num_classes, int64_t splits,
                           const Launch& launch) {
  constexpr int V = kVec<T>;
  const bool groups_vec = aligned && s.inner == 1 && s.D % V == 0;
  const bool runs_vec = aligned && s.inner > 1 && s.inner % V == 0;
  const dim3 block = reduce_block(s, groups_vec || runs_vec ? V : 1);
  const int64_t per_block = int64_t(block.x) * (groups_vec ? V : 1), tiles = (s.D + per_block - 1) / per_block;
  if (num_classes > 2147483647LL || tiles > 65535 || splits > 65535) {
    throw std::invalid_argument(std::string(kernel) + ": at most 2^31 - 1 classes, 65535 group tiles (of " +
                                std::to_string(per_block) + " groups here) and 65535 sample splits per launch");
  }
  const dim3 grid(static_cast<unsigned>(num_classes), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if (groups_vec) launch(ReduceWidth<V, false>{}, grid, block);
  else if (runs_vec) launch(ReduceWidth<V, true>{}, grid, block);
  else launch(ReduceWidth<1, false>{}, grid, block);
}

// Launches class_reduce_kernel for `op` with V-wide loads when the shape and every pointer allow it.
template <typename T, typename A, class Op>
void launch_class_reduce(const char* kernel, const Op& op, bool aligned, const int64_t* order, const int64_t* offsets,
                         const GroupShape& s, int64_t num_classes, int64_t splits, A* part1, A* part2,
                         cudaStream_t stream) {
  dispatch_class_reduce<T>(kernel, aligned, s, num_classes, splits, [&](auto width, dim3 grid, dim3 block) {
    using W = decltype(width);
    class_reduce_kernel<W::V, W::RUN><<<grid, block, 0, stream>>>(op, order, offsets, s, num_classes, part1, part2);
  });
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

}  // namespace lpa
