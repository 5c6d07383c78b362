// pgd_step (one block per class, or blocks over (feature tile, class) for few classes with long rows) and
// the fused class_grad + pgd_step (blocks over group tiles x classes x sample splits; the block completing a
// class updates it).
#include "class_reduce.cuh"
#include "kernels.h"
#include "pgd_row.cuh"

namespace lpa {

// With `ok` (not null): the training step's guarded step (lpa_kernels/pgd/naive.py, guarded_pgd_step_):
// a class whose gradient has a non-finite entry, or every class when *ok is false, keeps its delta, and
// the non-finite classes of an ok batch are counted into *skipped. With `rounded` (not null): the new
// delta also into it, in grad's dtype (head_pgd_'s class-space GEMM operand, rounded without a launch).
template <typename T, typename G>
__global__ void __launch_bounds__(kReduceThreads)
pgd_step_kernel(T* delta, const G* grad, const acc_t<T>* step, const acc_t<T>* eps, const acc_t<T>* direction,
                int64_t D, int norm, const bool* ok, unsigned long long* skipped, G* rounded) {
  __shared__ acc_t<T> scratch[kReduceThreads];
  const int64_t c = blockIdx.x;
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  bool keep = false;
  if (ok != nullptr) {
    int nonfinite = 0;
    for (int64_t j = t; j < D; j += nt) nonfinite |= !isfinite(load_as_acc(grad[c * D + j]));
    const bool skip = __syncthreads_or(nonfinite);  // uniform across the block
    const bool batch_ok = *ok;
    if (skip && batch_ok && t == 0) atomicAdd(skipped, 1ULL);
    keep = skip || !batch_ok;
  }
  if (!keep) pgd_update_row(delta + c * D, grad + c * D, D, step[c], eps[c], direction[c], norm, scratch);
  if (rounded == nullptr) return;
  // Each thread reads back only the entries it wrote itself (pgd_update_row's j = t + n * nt).
  for (int64_t j = t; j < D; j += nt) rounded[c * D + j] = store_from<G>(load_as_acc(delta[c * D + j]));
}

// ---- The split grid: blocks over (feature tile blockIdx.x, class blockIdx.y), for few classes with long
// rows (lpa_kernels/pgd/split.py, split_block; the scheme is lpa_kernels/pgd/triton_kernels.py's). ----

// The first phase's partials per (class, tile), stats[i * plane + c * tiles + tile] for i < 6 (plane =
// K x tiles; lpa_kernels/pgd/split.py, N_STATS): largest |g|, sum (g / largest)^2, sum delta * g /
// largest, sum delta^2, any g != 0, any g non-finite. Written by tile_partials, combined by
// combine_row_stats.

// Threads per block of the split grid: its tiles are short (64 to 1024 entries).
constexpr int kSplitThreads = 128;

// The partials of entries [begin, end) of one class row into at[i * plane], by the whole block. Each
// thread reads back only entries it stored itself (its j = begin + t + n * nt), so a caller may pass a
// row it has just written.
template <typename T, typename G, typename A>
__device__ void tile_partials(const T* delta_row, const G* grad_row, int64_t begin, int64_t end, int norm, A* at,
                              int64_t plane, A* scratch) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  A largest = 0;
  int nonzero = 0, nonfinite = 0;
  for (int64_t j = begin + t; j < end; j += nt) {
    const A g = load_as_acc(grad_row[j]);
    largest = nan_max(largest, A(fabs(g)));
    nonzero |= g != A(0);
    nonfinite |= !isfinite(g);
  }
  nonzero = __syncthreads_or(nonzero);
  nonfinite = __syncthreads_or(nonfinite);
  if (t == 0) at[4 * plane] = A(nonzero), at[5 * plane] = A(nonfinite);
  if (norm != kL2) return;
  largest = block_max(largest, scratch);
  const A by = largest > A(0) ? largest : A(1);  // an all-zero tile: sums of 0, no 0 / 0
  A squares = 0, dot = 0, delta_squares = 0;
  for (int64_t j = begin + t; j < end; j += nt) {
    const A s = l2_scaled(A(load_as_acc(grad_row[j])), by), d = load_as_acc(delta_row[j]);
    squares += s * s, dot += d * s, delta_squares += d * d;
  }
  squares = block_sum(squares, scratch);
  dot = block_sum(dot, scratch);
  delta_squares = block_sum(delta_squares, scratch);
  if (t == 0) at[0] = largest, at[plane] = squares, at[2 * plane] = dot, at[3 * plane] = delta_squares;
}

// A class's partials combined (the sums only for l2 and a row with a non-zero entry).
template <typename A>
struct RowStats {
  bool nonzero, nonfinite;
  A largest, squares, dot, delta_squares;
};

// Class c's tile partials (row = stats + c * tiles), by the whole block; read through L2 (other blocks
// wrote them). For l2, with M = max_b m_b: ||g / M||^2 = sum_b s_b (m_b / M)^2 (tiles holding Inf:
// factor 1, the others 0, as l2_scaled) and <delta, g / M> = sum_b p_b m_b / M.
template <typename A>
__device__ RowStats<A> combine_row_stats(const A* row, int64_t tiles, int64_t plane, int norm, A* scratch) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  A largest = 0;
  int nonzero = 0, nonfinite = 0;
  for (int64_t i = t; i < tiles; i += nt) {
    largest = nan_max(largest, __ldcg(row + i));
    nonzero |= __ldcg(row + 4 * plane + i) != A(0);
    nonfinite |= __ldcg(row + 5 * plane + i) != A(0);
  }
  RowStats<A> r{};
  r.nonzero = __syncthreads_or(nonzero);  // uniform across the block, as the return below
  r.nonfinite = __syncthreads_or(nonfinite);
  if (norm != kL2 || !r.nonzero) return r;
  r.largest = block_max(largest, scratch);
  const bool infinite = isinf(r.largest);
  A squares = 0, dot = 0, delta_squares = 0;
  for (int64_t i = t; i < tiles; i += nt) {
    const A m = __ldcg(row + i), factor = infinite ? A(isinf(m) ? 1 : 0) : m / r.largest;
    squares += __ldcg(row + plane + i) * factor * factor, dot += __ldcg(row + 2 * plane + i) * factor;
    delta_squares += __ldcg(row + 3 * plane + i);
  }
  r.squares = block_sum(squares, scratch);
  r.dot = block_sum(dot, scratch);
  r.delta_squares = block_sum(delta_squares, scratch);
  return r;
}

// The step of a class whose gradient is non-zero (stats r) into delta_row[begin, end), by the whole
// block; grad_row is read through L2 (other blocks may have written it). l2: the moved row's norm is
// ||delta + a g / M||^2 = ||delta||^2 + 2 a <delta, g / M> + a^2 ||g / M||^2, never formed.
template <typename T, typename G, typename A>
__device__ void apply_step(T* delta_row, const G* grad_row, int64_t begin, int64_t end, A step, A eps, A direction,
                           int norm, const RowStats<A>& r) {
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  if (norm == kLinf) {
    for (int64_t j = begin + t; j < end; j += nt) {
      const A moved = A(load_as_acc(delta_row[j])) + step * direction * sign_of(A(load_as_acc(__ldcg(grad_row + j))));
      delta_row[j] = store_from<T>(nan_max(nan_min(moved, eps), -eps));
    }
    return;
  }
  const A tiny = isinf(r.largest) ? A(0) : A(1e-12) / r.largest;  // the definition's 1e-12, scaled alike
  const A along = step * direction / (sqrt(r.squares) + tiny);
  // rounding may take the expansion a hair below 0 where the moved row is 0. A delta row holding +-Inf moves
  // to a row of Inf norm (a finite step cannot cancel it), which the expansion would make Inf - Inf = NaN
  // and leave unprojected: its Inf is kept (NaN stays NaN: not projected, as the definition does)
  const A moved_squares =
      isinf(r.delta_squares) ? r.delta_squares : r.delta_squares + A(2) * along * r.dot + along * along * r.squares;
  const A length = sqrt(moved_squares > A(0) ? moved_squares : A(0));
  const A radius = eps - eps * l2_radius_margin<A>();
  const bool outside = length > radius;
  for (int64_t j = begin + t; j < end; j += nt) {
    const A moved = A(load_as_acc(delta_row[j])) + along * l2_scaled(A(load_as_acc(__ldcg(grad_row + j))), r.largest);
    delta_row[j] = store_from<T>(outside ? moved * (radius / length) : moved);
  }
}

// Unguarded linf in one launch: an entry's step needs no norm. Whether the class's gradient is non-zero
// somewhere matters only to a tile whose own gradient is zero and whose delta lies outside the ball
// (clamped if the class moves, kept if not): that tile alone scans its row.
template <typename T, typename G>
__global__ void __launch_bounds__(kReduceThreads)
pgd_linf_tile_kernel(T* delta, const G* grad, const acc_t<T>* step, const acc_t<T>* eps, const acc_t<T>* direction,
                     int64_t D, int64_t tile) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.y, begin = int64_t(blockIdx.x) * tile, end = min64(D, begin + tile);
  const int t = threadIdx.x, nt = blockDim.x;
  T* delta_row = delta + c * D;
  const G* grad_row = grad + c * D;
  int nonzero = 0, outside = 0;
  for (int64_t j = begin + t; j < end; j += nt) {
    nonzero |= A(load_as_acc(grad_row[j])) != A(0);
    outside |= A(fabs(A(load_as_acc(delta_row[j])))) > eps[c];
  }
  bool active = __syncthreads_or(nonzero);  // uniform across the block, as every vote below
  if (!active && __syncthreads_or(outside)) {
    int any = 0;
    for (int64_t j = t; j < D; j += nt) any |= A(load_as_acc(grad_row[j])) != A(0);
    active = __syncthreads_or(any);
  }
  if (active) apply_step(delta_row, grad_row, begin, end, step[c], eps[c], direction[c], kLinf, RowStats<A>{});
}

// Phase 1: block (tile, class) writes its partials (the flags always, the sums for l2).
template <typename T, typename G>
__global__ void __launch_bounds__(kReduceThreads)
pgd_tile_stats_kernel(const T* delta, const G* grad, int64_t D, int64_t tile, int norm, acc_t<T>* stats) {
  __shared__ acc_t<T> scratch[kReduceThreads];
  const int64_t c = blockIdx.y, begin = int64_t(blockIdx.x) * tile;
  tile_partials(delta + c * D, grad + c * D, begin, min64(D, begin + tile), norm,
                stats + c * gridDim.x + blockIdx.x, int64_t(gridDim.x) * gridDim.y, scratch);
}

// Phase 2: block (tile, class) combines its row's partials and updates its tile; the guard (`ok` not
// null) as in pgd_step_kernel, the class counted into *skipped by its tile 0.
template <typename T, typename G>
__global__ void __launch_bounds__(kReduceThreads)
pgd_tile_update_kernel(T* delta, const G* grad, const acc_t<T>* step, const acc_t<T>* eps, const acc_t<T>* direction,
                       int64_t D, int64_t tile, int norm, const acc_t<T>* stats, const bool* ok,
                       unsigned long long* skipped) {
  __shared__ acc_t<T> scratch[kReduceThreads];
  const int64_t c = blockIdx.y, begin = int64_t(blockIdx.x) * tile, tiles = gridDim.x;
  const RowStats<acc_t<T>> r = combine_row_stats(stats + c * tiles, tiles, tiles * gridDim.y, norm, scratch);
  if (ok != nullptr) {
    const bool batch_ok = *ok;
    if (r.nonfinite && batch_ok && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(skipped, 1ULL);
    if (r.nonfinite || !batch_ok) return;
  }
  if (r.nonzero) apply_step(delta + c * D, grad + c * D, begin, min64(D, begin + tile), step[c], eps[c], direction[c], norm, r);
}

// Class sum of grad_out (times h for scale) for the fused kernel: no grad_h is written.
template <typename T>
struct ClassGradTerm {
  using A = acc_t<T>;
  const T* grad_out;
  const T* h;
  int mode;

  __device__ A class_state(int64_t, int64_t) const { return A(0); }
  template <int V>
  __device__ void element(int64_t idx, const A (&)[V], A (&sum)[V], A (&)[V]) const {
    const Vec<T, V> g = load_vec<V>(grad_out, idx);
    Vec<T, V> x;
    if (mode == kScale) x = load_vec<V>(h, idx);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A gj = load_as_acc(g.v[j]);
      sum[j] += mode == kAdd ? gj : gj * load_as_acc(x.v[j]);
    }
  }
};

// Block (class c = blockIdx.x, group tile blockIdx.y, sample split blockIdx.z): class c's gradient over
// its split-th share of samples for the tile's groups, into part[(split, c, k)] (fp32/fp64, never
// rounded), read V elements at a time as in class_reduce_kernel (V > 1: 16-byte loads of grad_out and
// h). The block completing a (tile, class) (the last of its splits to arrive, counted in
// arrivals[K + c * tiles + tile]) adds the splits in order into grad row c's tile and writes the
// tile's partials (tile_partials, as pgd_step's split grid); the block completing class c (the last
// of its tiles, counted in arrivals[c]) combines them and writes the PGD update of delta row c in one
// pass, all in the same launch. The other blocks never wait: they have finished when they arrive. Each
// launch leaves every arrival counter at zero, as it found it.
template <int V, bool RUN, typename T, typename TD>
__global__ void __launch_bounds__(kReduceThreads)
class_grad_pgd_step_kernel(TD* delta, ClassGradTerm<T> term, const int64_t* order, const int64_t* offsets,
                           const acc_t<T>* step, const acc_t<T>* eps, const acc_t<T>* direction, GroupShape s,
                           int norm, acc_t<T>* part, acc_t<T>* grad, acc_t<T>* stats, int* arrivals) {
  using A = acc_t<T>;
  __shared__ A scratch[kReduceThreads * (RUN ? 1 : V)];  // the row functions use the first kReduceThreads
  __shared__ int completes;
  const int64_t c = blockIdx.x, K = gridDim.x, tile = blockIdx.y, tiles = gridDim.y, splits = gridDim.z;
  block_class_partials<V, RUN>(term, order, offsets, s, K, part, static_cast<A*>(nullptr), scratch);
  const int t = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  // Whether this block is the last to arrive at `counter`, out of `expected` (uniform across the block).
  // The last one also sets the counter back to 0, so the next launch on the stream (a prepared step,
  // lpa_kernels/pgd/cuda_kernels.py) finds it zeroed without a fill: every other block has counted
  // itself (atomics on one address are totally ordered, and this one returned expected - 1) and never
  // touches the counter again, the same thread's later store to the same address follows its atomic
  // in that address's coherence order, and the kernel's end makes it visible to the next launch.
  const auto last_to_arrive = [&](int* counter, int64_t expected) {
    __threadfence();  // this thread's stores are visible device-wide before the block's arrival counts
    __syncthreads();
    if (t == 0) {
      completes = atomicAdd(counter, 1) == int(expected) - 1;
      if (completes) *counter = 0;
    }
    __syncthreads();
    const bool last = completes;
    __syncthreads();  // `completes` is read by every thread before it can be written again
    __threadfence();
    return last;
  };
  if (!last_to_arrive(arrivals + K + c * tiles + tile, splits)) return;
  const int64_t groups = int64_t(blockDim.x) * (RUN ? 1 : V), begin = tile * groups;
  const int64_t end = min64(s.D, begin + groups);
  A* grad_row = grad + c * s.D;
  for (int64_t j = begin + t; j < end; j += nt) {
    A total = 0;
    for (int64_t i = 0; i < splits; ++i) total += __ldcg(part + (i * K + c) * s.D + j);  // L2: other SMs wrote them
    grad_row[j] = total;
  }
  TD* delta_row = delta + c * s.D;
  tile_partials(delta_row, static_cast<const A*>(grad_row), begin, end, norm, stats + c * tiles + tile, K * tiles,
                scratch);
  if (!last_to_arrive(arrivals + c, tiles)) return;
  const RowStats<A> r = combine_row_stats(stats + c * tiles, tiles, K * tiles, norm, scratch);
  if (r.nonzero) apply_step(delta_row, static_cast<const A*>(grad_row), 0, s.D, step[c], eps[c], direction[c], norm, r);
}

template <typename T, typename G>
void launch_pgd_step(T* delta, const G* grad, const acc_t<T>* step, const acc_t<T>* eps, const acc_t<T>* direction,
                     int64_t K, int64_t D, int norm, const bool* ok, unsigned long long* skipped, int64_t tile,
                     acc_t<T>* stats, G* rounded, cudaStream_t stream) {
  if (tile <= 0) {
    pgd_step_kernel<T, G><<<K, kReduceThreads, 0, stream>>>(delta, grad, step, eps, direction, D, norm, ok, skipped,
                                                            rounded);
    return;
  }
  const dim3 grid(static_cast<unsigned>((D + tile - 1) / tile), static_cast<unsigned>(K));
  if (norm == kLinf && ok == nullptr) {
    pgd_linf_tile_kernel<T, G><<<grid, kSplitThreads, 0, stream>>>(delta, grad, step, eps, direction, D, tile);
    return;
  }
  pgd_tile_stats_kernel<T, G><<<grid, kSplitThreads, 0, stream>>>(delta, grad, D, tile, norm, stats);
  pgd_tile_update_kernel<T, G><<<grid, kSplitThreads, 0, stream>>>(delta, grad, step, eps, direction, D, tile, norm, stats,
                                                                    ok, skipped);
}

// A float32 iterate stepped from a 16-bit gradient (head_pgd_'s class-space GEMM output), one block per
// class; pgd_step checks the dtypes (no other T reaches it).
template <typename T>
void launch_float_step_from_16_bit(T* delta, const void* grad, int grad_dtype, const acc_t<T>* step,
                                   const acc_t<T>* eps, const acc_t<T>* direction, int64_t K, int64_t D, int norm,
                                   const bool* ok, unsigned long long* skipped, void* rounded, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (grad_dtype == kBFloat16) {
      pgd_step_kernel<float, __nv_bfloat16><<<K, kReduceThreads, 0, stream>>>(
          delta, static_cast<const __nv_bfloat16*>(grad), step, eps, direction, D, norm, ok, skipped,
          static_cast<__nv_bfloat16*>(rounded));
    } else {
      pgd_step_kernel<float, __half><<<K, kReduceThreads, 0, stream>>>(
          delta, static_cast<const __half*>(grad), step, eps, direction, D, norm, ok, skipped,
          static_cast<__half*>(rounded));
    }
  }
}

void pgd_step(void* delta, const void* grad, const void* step, const void* eps, const void* direction, int64_t K,
              int64_t D, int norm, int dtype, int grad_dtype, const bool* ok, int64_t* skipped, int64_t tile,
              void* stats, void* rounded, cudaStream_t stream) {
  auto counter = reinterpret_cast<unsigned long long*>(skipped);
  if (K > (tile > 0 ? 65535LL : 2147483647LL)) throw std::invalid_argument("pgd_step: too many classes");
  if (tile > 0 && (D + tile - 1) / tile > 2147483647LL) throw std::invalid_argument("pgd_step: too many tiles");
  if (tile > 0 && rounded != nullptr) throw std::invalid_argument("pgd_step: `rounded` needs one block per class");
  const bool sixteen_bit_grad = grad_dtype == kBFloat16 || grad_dtype == kFloat16;
  if (grad_dtype != dtype && !(dtype == kFloat32 && sixteen_bit_grad && tile <= 0) &&
      grad_dtype != (dtype == kFloat64 ? kFloat64 : kFloat32))
    throw std::invalid_argument("pgd_step: grad's dtype must be delta's, its accumulation dtype, or 16-bit for "
                                "a float32 delta with one block per class");
  LPA_DISPATCH(dtype, "pgd_step", {
    using A = acc_t<scalar_t>;
    auto d = static_cast<scalar_t*>(delta);
    auto st = static_cast<const A*>(step);
    auto ep = static_cast<const A*>(eps);
    auto dir = static_cast<const A*>(direction);
    auto sums = static_cast<A*>(stats);
    if (grad_dtype == dtype) {
      launch_pgd_step(d, static_cast<const scalar_t*>(grad), st, ep, dir, K, D, norm, ok, counter, tile, sums,
                      static_cast<scalar_t*>(rounded), stream);
    } else if (sixteen_bit_grad) {
      launch_float_step_from_16_bit(d, grad, grad_dtype, st, ep, dir, K, D, norm, ok, counter, rounded, stream);
    } else {
      launch_pgd_step(d, static_cast<const A*>(grad), st, ep, dir, K, D, norm, ok, counter, tile, sums,
                      static_cast<A*>(rounded), stream);
    }
  })
  check_launch("pgd_step");
}

template <typename T, typename TD>
void launch_class_grad_pgd_step(void* delta, const void* grad_out, const void* h, const int64_t* order,
                                const int64_t* offsets, const void* step, const void* eps, const void* direction,
                                int64_t K, const GroupShape& s, int mode, int norm, int64_t splits, int64_t max_tiles,
                                void* workspace, int* arrivals, cudaStream_t stream) {
  using A = acc_t<T>;
  const ClassGradTerm<T> term{static_cast<const T*>(grad_out), static_cast<const T*>(h), mode};
  const bool aligned = aligned16(grad_out) && (mode != kScale || aligned16(h));
  A* part = static_cast<A*>(workspace);
  dispatch_class_reduce<T>("class_grad_pgd_step", aligned, s, K, splits, [&](auto width, dim3 grid, dim3 block) {
    using W = decltype(width);
    if (grid.y > max_tiles) throw std::invalid_argument("class_grad_pgd_step: more group tiles than max_tiles");
    class_grad_pgd_step_kernel<W::V, W::RUN, T, TD><<<grid, block, 0, stream>>>(
        static_cast<TD*>(delta), term, order, offsets, static_cast<const A*>(step), static_cast<const A*>(eps),
        static_cast<const A*>(direction), s, norm, part, part + splits * K * s.D, part + (splits + 1) * K * s.D,
        arrivals);
  });
}

void class_grad_pgd_step(void* delta, const void* grad_out, const void* h, const int64_t* order,
                         const int64_t* offsets, const void* step, const void* eps, const void* direction, int64_t K,
                         int64_t F, int64_t D, int64_t inner, int mode, int norm, int dtype, int delta_dtype,
                         int64_t splits, int64_t max_tiles, void* workspace, int* arrivals, cudaStream_t stream) {
  const GroupShape s{F, D, inner, F / (D * inner)};
  // The per-class step/eps/direction and the workspace are in the gradient's acc type; delta may be
  // any dtype whose acc type matches it (float32 delta with half gradients, or the gradient's own).
  LPA_DISPATCH(dtype, "class_grad_pgd_step", {
    if (delta_dtype == dtype) {
      launch_class_grad_pgd_step<scalar_t, scalar_t>(delta, grad_out, h, order, offsets, step, eps, direction, K, s, mode, norm, splits, max_tiles, workspace, arrivals, stream);
    } else if (delta_dtype == (std::is_same_v<acc_t<scalar_t>, double> ? kFloat64 : kFloat32)) {
      launch_class_grad_pgd_step<scalar_t, acc_t<scalar_t>>(delta, grad_out, h, order, offsets, step, eps, direction, K, s, mode, norm, splits, max_tiles, workspace, arrivals, stream);
    } else {
      throw std::invalid_argument("class_grad_pgd_step: delta must have grad_out's dtype or its accumulation dtype");
    }
  })
  check_launch("class_grad_pgd_step_kernel");
}

}  // namespace lpa
