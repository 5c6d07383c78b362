// PGD's update of one row by a whole block (pgd_update_row) and the L2 helpers it shares with the split
// grid of pgd.cu; also run by the fused class-space head_pgd_ steps (head_pgd_fused.cu).
#pragma once

#include "common.cuh"

namespace lpa {

// The L2 projection targets eps - eps * margin (lpa_kernels._common.L2_RADIUS_MARGIN): the norm it divides
// by is rounded, and the margin keeps a projected row from landing an ulp outside the ball.
template <typename A> __device__ __forceinline__ A l2_radius_margin() {
  return std::is_same_v<A, double> ? A(0x1p-45) : A(0x1p-19);
}

// An entry of the L2 direction before normalisation (lpa_kernels/pgd/naive.py, l2_unit): g / largest, so
// ||.||^2 cannot overflow; in a row holding Inf, the sign of its Inf entries, finite entries 0 (g * 0
// keeps a NaN entry NaN).
template <typename A> __device__ __forceinline__ A l2_scaled(A g, A largest) {
  if (isinf(largest)) return isinf(g) ? sign_of(g) : g * A(0);
  return g / largest;
}

// One PGD step on delta_row (D entries of class c) from its gradient grad_row, by the whole block.
// linf: clamp(delta + step * dir * sign(g), -eps, eps); l2: delta + step * dir * g / (||g|| + 1e-12),
// scaled back onto ||delta|| <= eps - eps * margin. A row whose gradient is zero everywhere is left
// untouched; NaN is not zero and propagates (nan_min/nan_max, and NaN norms make every entry NaN), as in
// the reference.
template <typename T, typename G, typename A>
__device__ void pgd_update_row(T* delta_row, const G* grad_row, int64_t D, A step, A eps, A direction, int norm,
                               A* scratch) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  A largest = 0;
  int nonzero = 0;
  for (int64_t j = t; j < D; j += nt) {
    const A g = load_as_acc(grad_row[j]);
    largest = nan_max(largest, A(fabs(g)));
    nonzero |= (g != A(0));
  }
  if (!__syncthreads_or(nonzero)) return;  // uniform across the block
  if (norm == kLinf) {
    for (int64_t j = t; j < D; j += nt) {
      const A moved = A(load_as_acc(delta_row[j])) + step * direction * sign_of(A(load_as_acc(grad_row[j])));
      delta_row[j] = store_from<T>(nan_max(nan_min(moved, eps), -eps));
    }
    return;
  }
  largest = block_max(largest, scratch);
  A squares = 0;
  for (int64_t j = t; j < D; j += nt) {
    const A s = l2_scaled(A(load_as_acc(grad_row[j])), largest);
    squares += s * s;
  }
  const A tiny = isinf(largest) ? A(0) : A(1e-12) / largest;  // the definition's 1e-12, scaled alike
  const A along = step * direction / (sqrt(block_sum(squares, scratch)) + tiny);
  A moved_squares = 0;
  for (int64_t j = t; j < D; j += nt) {
    const A moved = A(load_as_acc(delta_row[j])) + along * l2_scaled(A(load_as_acc(grad_row[j])), largest);
    moved_squares += moved * moved;
  }
  const A length = sqrt(block_sum(moved_squares, scratch));
  const A radius = eps - eps * l2_radius_margin<A>();
  const bool outside = length > radius;
  for (int64_t j = t; j < D; j += nt) {
    const A moved = A(load_as_acc(delta_row[j])) + along * l2_scaled(A(load_as_acc(grad_row[j])), largest);
    delta_row[j] = store_from<T>(outside ? moved * (radius / length) : moved);
  }
}

}  // namespace lpa
