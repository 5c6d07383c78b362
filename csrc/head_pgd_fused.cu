// class_space_steps: every class-space step of head_pgd_ in ONE launch, for heads with few classes (the
// CUDA twin of lpa_kernels/head_pgd/triton_fused.py, whose docstring gives the algorithm and its cost).
//
// Once the direction is given, nothing couples two classes: block x owns classes c0 = 16 x .. c0 + 15
// (the M of a wmma tile) and runs all T steps for them, each phase on the whole block, a __syncthreads
// between phases (a phase reads what other threads of the block wrote, in shared or global memory):
// 1. E[c] = current[c] @ W.T for the block's rows c (the iterate rounded to the GEMM dtype T), into the
//    (K, K) float32 scratch `shift`;
// 2. the block's samples are contiguous in the label plan's class order (order[starts[c0]:starts[c0 +
//    16]]): four samples at a time, 32 lanes each give a sample b of class c the pivot and 1 / sum of
//    softmax(base_b + E[c]) (row_softmax.cuh, fixed-order combinations) into `softmax` (2, B); then each
//    thread owns (class c, column k) pairs and adds class c's probabilities in column k over its samples
//    in order (deterministic, and a NaN sample reaches its own class's row only), minus the class count
//    on the diagonal, times class_sum_scale (common.cuh: finite in float16 for any count), rounded to T
//    into the (K, K) scratch `sums`;
// 3. G[c] = S[c] @ W into the (K, D) float32 scratch `grad`;
// 4. pgd's update of each of the block's rows (pgd_row.cuh, pgd_update_row): a class absent from the
//    batch has S = 0, so G = 0, and keeps its delta.
// Under the training step's guard (skipped not null; loop.guarded's rule) the block copies its rows into
// `previous` first and, after the last step, puts the copy back into each row that is not finite (all of
// them when *ok is false), counting the non-finite rows of an ok batch into *skipped (integer atomics).
// The GEMMs (block_rows_gemm) run 16 x 64 output tiles, 32 deep, staged in shared memory: fp16/bf16 on
// tensor cores (one 16x16x16 wmma fragment per warp, float accumulation); float32 as plain FMA loops in
// float (exact float32 products, so TF32 is never used; fine for the few classes served here).
#include <mma.h>

#include "common.cuh"
#include "kernels.h"
#include "pgd_row.cuh"
#include "row_softmax.cuh"

namespace lpa {

constexpr int kClassBlock = 16;  // classes per block: the M of a wmma tile
constexpr int kTileN = 64, kTileL = 32, kTilePad = 8;  // output columns and depth per GEMM tile; row padding
constexpr int kFusedWarps = kTileN / 16;  // one 16-column wmma fragment per warp
constexpr int kFusedThreads = 32 * kFusedWarps;
constexpr int kOutputsPerThread = kClassBlock * kTileN / kFusedThreads;  // float32 FMA path

// The staged operands of one GEMM tile: a[i][l] = A(i, l0 + l), b[n][l] = B(l0 + l, n0 + n) (B column-major,
// as a wmma col_major fragment reads it), c the float result tile. Rows of 40 elements keep every
// fragment pointer 32-byte aligned, as wmma requires.
template <typename T>
struct GemmTiles {
  T a[kClassBlock][kTileL + kTilePad];
  T b[kTileN][kTileL + kTilePad];
  float c[kClassBlock][kTileN + 4];
};

// out(i, n, value) for i < 16 and n < N (out skips what lies outside the real matrix), value =
// sum_{l < L} A(i, l) B(l, n) accumulated in float, A and B given by load_a(i, l) and load_b(l, n)
// (zero outside). B_N_FASTEST: consecutive threads stage consecutive n (else consecutive l), so the
// global reads of B are coalesced whichever of its indices is contiguous. Every thread of the block
// calls it (it holds __syncthreads); it ends with one, so its tiles and outputs are free and visible.
template <typename T, bool B_N_FASTEST, typename LoadA, typename LoadB, typename Out>
__device__ void block_rows_gemm(int64_t N, int64_t L, LoadA load_a, LoadB load_b, Out out, GemmTiles<T>& tiles) {
  using namespace nvcuda;
  constexpr bool kTensorCores = !std::is_same_v<T, float>;
  const int t = threadIdx.y * blockDim.x + threadIdx.x, warp = t / 32;
  for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    float fma_acc[kOutputsPerThread] = {};  // float32: outputs (t / 64 + 2 j, t % 64)
    if constexpr (kTensorCores) wmma::fill_fragment(acc, 0.0f);
    for (int64_t l0 = 0; l0 < L; l0 += kTileL) {
      for (int e = t; e < kClassBlock * kTileL; e += kFusedThreads) {
        tiles.a[e / kTileL][e % kTileL] = load_a(e / kTileL, l0 + e % kTileL);
      }
      for (int e = t; e < kTileN * kTileL; e += kFusedThreads) {
        const int n = B_N_FASTEST ? e % kTileN : e / kTileL, l = B_N_FASTEST ? e / kTileN : e % kTileL;
        tiles.b[n][l] = load_b(l0 + l, n0 + n);
      }
      __syncthreads();
      if constexpr (kTensorCores) {
#pragma unroll
        for (int kk = 0; kk < kTileL; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(a, &tiles.a[0][kk], kTileL + kTilePad);
          wmma::load_matrix_sync(b, &tiles.b[16 * warp][kk], kTileL + kTilePad);
          wmma::mma_sync(acc, a, b, acc);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kOutputsPerThread; ++j) {
          const int i = t / kTileN + j * (kFusedThreads / kTileN), n = t % kTileN;
          for (int l = 0; l < kTileL; ++l) fma_acc[j] += tiles.a[i][l] * tiles.b[n][l];
        }
      }
      __syncthreads();  // the tiles are restaged next
    }
    if constexpr (kTensorCores) {
      wmma::store_matrix_sync(&tiles.c[0][16 * warp], acc, kTileN + 4, wmma::mem_row_major);
    } else {
#pragma unroll
      for (int j = 0; j < kOutputsPerThread; ++j) tiles.c[t / kTileN + j * (kFusedThreads / kTileN)][t % kTileN] = fma_acc[j];
    }
    __syncthreads();
    for (int e = t; e < kClassBlock * kTileN; e += kFusedThreads) out(e / kTileN, n0 + e % kTileN, tiles.c[e / kTileN][e % kTileN]);
    __syncthreads();
  }
}

// Block layout dim3(32, kFusedWarps): 32 lanes per softmax row (threadIdx.x), warps 0..3 (threadIdx.y).
// __maxnreg__ instead of __launch_bounds__(kFusedThreads): under the latter, nvcc 13.0's ptxas kept the
// fp16 instance at 72 registers and spilled one address to local memory; 128 registers spill nothing.
template <typename T>
__global__ void __maxnreg__(128)
class_space_steps_kernel(float* current, const T* base, const T* weight, const int64_t* order, const int64_t* starts,
                         const float* step, const float* eps, const float* direction, float* shift, T* sums,
                         float* grad, float* softmax, float* previous, const bool* ok, unsigned long long* skipped,
                         int64_t B, int64_t K, int64_t D, int64_t steps, int norm) {
  __shared__ __align__(32) GemmTiles<T> tiles;
  __shared__ float scratch[kFusedThreads];
  const int64_t c0 = int64_t(blockIdx.x) * kClassBlock;
  const int classes = static_cast<int>(min64(kClassBlock, K - c0));
  const int t = threadIdx.y * blockDim.x + threadIdx.x, lane = threadIdx.x;
  const T zero = store_from<T>(0.0f);
  const auto weight_at = [=](int64_t k, int64_t d) { return k < K && d < D ? weight[k * D + d] : zero; };
  if (skipped != nullptr) {  // the block's rows are contiguous: c0 * D .. (c0 + classes) * D
    for (int64_t e = t; e < classes * D; e += kFusedThreads) previous[c0 * D + e] = current[c0 * D + e];
  }
  for (int64_t iteration = 0; iteration < steps; ++iteration) {
    // 1. E rows of the block's classes
    block_rows_gemm<T, false>(
        K, D, [=](int i, int64_t d) { return i < classes && d < D ? store_from<T>(current[(c0 + i) * D + d]) : zero; },
        [=](int64_t d, int64_t k) { return weight_at(k, d); },
        [=](int i, int64_t k, float e) { if (i < classes && k < K) shift[(c0 + i) * K + k] = e; }, tiles);
    // 2. each sample's softmax pivot and 1 / sum (uniform loops: row_softmax_stats holds __syncthreads) ...
    for (int i = 0; i < classes; ++i) {
      const int64_t end = starts[c0 + i + 1];
      const float* shift_row = shift + (c0 + i) * K;
      for (int64_t first = starts[c0 + i]; first < end; first += blockDim.y) {
        const int64_t pos = first + threadIdx.y;
        const bool live = pos < end;
        const T* z_row = base + (live ? order[pos] : 0) * K;
        float lane_max = -INFINITY, lane_sum = 0;
        if (live) {
          for (int64_t k = lane; k < K; k += blockDim.x) online_add(load_as_acc(z_row[k]) + shift_row[k], lane_max, lane_sum);
        }
        float pivot, inv_sum;
        row_softmax_stats(lane_max, lane_sum, scratch, pivot, inv_sum);
        if (live && lane == 0) {
          softmax[pos] = pivot;
          softmax[B + pos] = inv_sum;
        }
      }
    }
    __syncthreads();
    // ... then the per-class sums, each (class, column) over the class's samples in order
    for (int64_t e = t; e < classes * K; e += kFusedThreads) {
      const int64_t c = c0 + e / K, k = e % K, first = starts[c], end = starts[c + 1];
      const float offset = shift[c * K + k];
      float total = 0;
      for (int64_t pos = first; pos < end; ++pos) {
        total += exp(load_as_acc(base[order[pos] * K + k]) + offset - softmax[pos]) * softmax[B + pos];
      }
      sums[c * K + k] = store_from<T>((k == c ? total - float(end - first) : total) * class_sum_scale<T, float>(end - first));
    }
    __syncthreads();
    // 3. G rows of the block's classes
    block_rows_gemm<T, true>(
        D, K, [=](int i, int64_t k) { return i < classes && k < K ? sums[(c0 + i) * K + k] : zero; }, weight_at,
        [=](int i, int64_t d, float g) { if (i < classes && d < D) grad[(c0 + i) * D + d] = g; }, tiles);
    // 4. the projected update, row by row (each by the whole block)
    for (int i = 0; i < classes; ++i) {
      const int64_t c = c0 + i;
      pgd_update_row(current + c * D, grad + c * D, D, step[c], eps[c], direction[c], norm, scratch);
    }
    __syncthreads();  // the next step's E reads the updated rows
  }
  if (skipped == nullptr) return;
  const bool batch_ok = ok == nullptr || *ok;
  for (int i = 0; i < classes; ++i) {
    float* row = current + (c0 + i) * D;
    bool mine = false;
    for (int64_t d = t; d < D; d += kFusedThreads) mine |= !isfinite(row[d]);
    const bool non_finite = __syncthreads_or(mine);
    if (non_finite || !batch_ok) {
      for (int64_t d = t; d < D; d += kFusedThreads) row[d] = previous[(c0 + i) * D + d];
    }
    if (non_finite && batch_ok && t == 0) atomicAdd(skipped, 1ULL);
  }
}

void class_space_steps(float* current, const void* base, const void* weight, const int64_t* order,
                       const int64_t* starts, const float* step, const float* eps, const float* direction, float* shift,
                       void* sums, float* grad, float* softmax, float* previous, const bool* ok, int64_t* skipped,
                       int64_t B, int64_t K, int64_t D, int64_t steps, int norm, int dtype, cudaStream_t stream) {
  if (K > 2147483647LL) throw std::invalid_argument("class_space_steps: too many classes");
  if (K == 0 || steps <= 0) return;
  const unsigned blocks = static_cast<unsigned>((K + kClassBlock - 1) / kClassBlock);
  const auto launch = [&](auto gemm_type) {
    using T = decltype(gemm_type);
    class_space_steps_kernel<T><<<blocks, dim3(32, kFusedWarps), 0, stream>>>(
        current, static_cast<const T*>(base), static_cast<const T*>(weight), order, starts, step, eps, direction, shift,
        static_cast<T*>(sums), grad, softmax, previous, ok, reinterpret_cast<unsigned long long*>(skipped), B, K, D,
        steps, norm);
  };
  switch (dtype) {  // no float64: wmma has no double tiles, and loop.py runs float64 without this kernel
    case kFloat32: launch(float{}); break;
    case kFloat16: launch(__half{}); break;
    case kBFloat16: launch(__nv_bfloat16{}); break;
    default:
      throw std::invalid_argument("class_space_steps: the GEMM dtype must be float32, float16 or bfloat16 (code " +
                                  std::to_string(dtype) + ")");
  }
  check_launch("class_space_steps_kernel");
}

}  // namespace lpa
