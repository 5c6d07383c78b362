// One softmax row's statistics by blockDim.x lanes of a block (row_softmax_stats: each lane's online
// maximum and sum, combined in a fixed tree order): used by head_pgd.cu's kernels and the fused
// class-space head_pgd_ steps (head_pgd_fused.cu).
#pragma once

#include <cmath>

#include "common.cuh"

namespace lpa {

// Tree combination of one row's blockDim.x (a power of two) values in scratch; every lane gets the
// result. All threads of the block call it (rows past B included), as it holds __syncthreads.
template <typename A, typename Op>
__device__ A row_combine(A value, A* scratch, Op op) {
  const int lanes = blockDim.x, lane = threadIdx.x, t = threadIdx.y * lanes + lane;
  scratch[t] = value;
  __syncthreads();
  for (int half = lanes / 2; half > 0; half /= 2) {
    if (lane < half) scratch[t] = op(scratch[t], scratch[t + half]);
    __syncthreads();
  }
  const A total = scratch[threadIdx.y * lanes];
  __syncthreads();  // scratch is reused by the next combination
  return total;
}

// One logit into a lane's online softmax state (running maximum, sum of exp(z - maximum)). A lane with no
// finite logit yet has max -inf and sum 0; a NaN logit makes the sum NaN, and so the whole row (as
// torch's softmax does).
template <typename A>
__device__ __forceinline__ void online_add(A v, A& lane_max, A& lane_sum) {
  if (v > lane_max) {
    lane_sum = lane_sum * exp(lane_max - v) + A(1);
    lane_max = v;
  } else if (v != -INFINITY) {
    lane_sum += exp(v - lane_max);
  }
}

// The row's pivot and 1 / sum from its lanes' online states (row_combine: every thread of the block
// calls it). softmax = exp(z - pivot) * inv_sum.
template <typename A>
__device__ void row_softmax_stats(A lane_max, A lane_sum, A* scratch, A& pivot, A& inv_sum) {
  const A row_max = row_combine(lane_max, scratch, [](A a, A c) { return nan_max(a, c); });
  pivot = row_max == -INFINITY ? A(0) : row_max;
  const A rescaled = lane_sum == A(0) ? A(0) : lane_sum * exp(lane_max - pivot);
  inv_sum = A(1) / row_combine(rescaled, scratch, [](A a, A c) { return a + c; });
}

}  // namespace lpa
