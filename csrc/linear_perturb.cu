// linear_perturb: a tensor-core (wmma) GEMM whose epilogue adds the bias, applies the activation and
// perturbs each row by its sample's class; the same epilogue as an elementwise kernel over a
// precomputed product (float32/float64, where tensor cores would change the precision); and the
// backward epilogue (grad_preact, and the class sums giving grad_delta and grad_bias) in one pass.
#include <mma.h>

#include "class_reduce.cuh"
#include "linear_epilogue.cuh"
#include "kernels.h"

namespace lpa {

// Block tile BM x BN of the output, BK deep per step; 4 warps in a 2 x 2 grid each own a 32 x 32
// sub-tile (2 x 2 wmma 16x16x16 fragments, float accumulators). Shared tiles are padded by 8
// elements so fragment loads of consecutive rows hit different banks, and every fragment pointer
// stays 32-byte aligned as wmma requires.
constexpr int kBM = 64, kBN = 64, kBK = 32, kPad = 8, kGemmThreads = 128;

// Rows row0.. of a (rows, Kin) row-major matrix, columns k0..k0 + kBK, into tile (zero outside).
// VEC: 16-byte loads (Kin % 8 == 0 and a 16-byte aligned base, so a vector never straddles a row end).
template <typename T, bool VEC>
__device__ void load_tile(T (*tile)[kBK + kPad], const T* src, int64_t row0, int64_t rows, int64_t k0, int64_t Kin) {
  if constexpr (VEC) {
    constexpr int per_row = kBK / kVec<T>;
    for (int v = threadIdx.x; v < kBM * per_row; v += kGemmThreads) {
      const int r = v / per_row, col = (v % per_row) * kVec<T>;
      const int64_t gr = row0 + r, gk = k0 + col;
      Vec<T, kVec<T>> chunk;
      if (gr < rows && gk < Kin) {
        chunk = *reinterpret_cast<const Vec<T, kVec<T>>*>(src + gr * Kin + gk);
      } else {
#pragma unroll
        for (int j = 0; j < kVec<T>; ++j) chunk.v[j] = store_from<T>(0.0f);
      }
      *reinterpret_cast<Vec<T, kVec<T>>*>(&tile[r][col]) = chunk;
    }
  } else {
    for (int e = threadIdx.x; e < kBM * kBK; e += kGemmThreads) {
      const int r = e / kBK, col = e % kBK;
      const int64_t gr = row0 + r, gk = k0 + col;
      tile[r][col] = gr < rows && gk < Kin ? src[gr * Kin + gk] : store_from<T>(0.0f);
    }
  }
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kGemmThreads)
linear_wmma_kernel(T* out, T* preact, const T* x, const T* weight, Epilogue<float> epi, int64_t M, int64_t Kin) {
  using namespace nvcuda;
  __shared__ __align__(32) T x_tile[kBM][kBK + kPad];
  __shared__ __align__(32) T w_tile[kBN][kBK + kPad];
  __shared__ __align__(32) float c_tile[kBM][kBN + 4];
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < Kin; k0 += kBK) {
    load_tile<T, VEC>(x_tile, x, m0, M, k0, Kin);
    load_tile<T, VEC>(w_tile, weight, n0, epi.N, k0, Kin);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      // x tile is A (row-major); w tile holds W[n][k] = B[k][n], i.e. B in column-major order.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &x_tile[wm + 16 * i][kk], kBK + kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &w_tile[wn + 16 * j][kk], kBK + kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c_tile[wm + 16 * i][wn + 16 * j], acc[i][j], kBN + 4, wmma::mem_row_major);
  __syncthreads();
  // Consecutive threads take consecutive columns, so the output rows are written coalesced.
  for (int e = threadIdx.x; e < kBM * kBN; e += kGemmThreads) {
    const int r = e / kBN, col = e % kBN;
    const int64_t m = m0 + r, n = n0 + col;
    if (m < M && n < epi.N) epi.apply(c_tile[r][col], m, n, out, preact);
  }
}

// The epilogue over a precomputed product z (M, N); preact may alias z (each cell is read before written).
template <typename T>
__global__ void linear_epilogue_kernel(T* out, T* preact, const T* z, Epilogue<acc_t<T>> epi, int64_t M) {
  const int64_t n_cells = M * epi.N, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n_cells; idx += stride) {
    epi.apply(load_as_acc(z[idx]), idx / epi.N, idx % epi.N, out, preact);
  }
}

// Backward elementwise part: grad_preact = grad_out * (1 or 1 + d) * act'(z); the class sums are
// grad_out (add) or grad_out * act(z) (scale) for grad_delta, and grad_preact for grad_bias.
template <typename T>
struct LinearGrad {
  using A = acc_t<T>;
  const T* grad_out;
  const T* preact;  // null when not needed (activation "none", mode "add")
  const A* delta;
  T* grad_preact;
  int64_t N;
  int activation, mode;

  __device__ A class_state(int64_t c, int64_t k) const { return delta[c * N + k]; }

  template <int V>
  __device__ void element(int64_t idx, const A (&d)[V], A (&delta_sum)[V], A (&bias_sum)[V]) const {
    const Vec<T, V> g = load_vec<V>(grad_out, idx);
    Vec<T, V> z, gp;
    if (preact != nullptr) z = load_vec<V>(preact, idx);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A gj = load_as_acc(g.v[j]);
      A slope = A(1), a = A(0);  // no preact: activation "none" in add mode reads neither
      if (preact != nullptr) a = activate(A(load_as_acc(z.v[j])), activation, &slope);
      const A grad_z = (mode == kAdd ? gj : gj * (A(1) + d[j])) * slope;
      gp.v[j] = store_from<T>(grad_z);
      delta_sum[j] += mode == kAdd ? gj : gj * a;
      bias_sum[j] += grad_z;
    }
    store_vec<V>(grad_preact, idx, gp);
  }
};

void linear_forward(void* out, void* preact, const void* x, const void* weight, const void* bias,
                    const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                    int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (N > int64_t(kBN) * 65535) throw std::invalid_argument("linear_forward: out_features too large for one launch");
  const Epilogue<float> epi{static_cast<const float*>(bias), labels, static_cast<const float*>(delta), N,
                            rows_per_label, activation, mode};
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>((N + kBN - 1) / kBN));
  const bool vec = Kin % 8 == 0 && aligned16(x) && aligned16(weight);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto o = static_cast<T*>(out);
    auto p = static_cast<T*>(preact);
    auto a = static_cast<const T*>(x);
    auto w = static_cast<const T*>(weight);
    if (vec) linear_wmma_kernel<T, true><<<grid, kGemmThreads, 0, stream>>>(o, p, a, w, epi, M, Kin);
    else linear_wmma_kernel<T, false><<<grid, kGemmThreads, 0, stream>>>(o, p, a, w, epi, M, Kin);
  };
  if (dtype == kFloat16) run(__half());
  else if (dtype == kBFloat16) run(__nv_bfloat16());
  else throw std::invalid_argument("linear_forward: the tensor-core GEMM takes float16 or bfloat16");
  check_launch("linear_wmma_kernel");
}

void linear_epilogue(void* out, void* preact, const void* z, const void* bias, const int64_t* labels,
                     const void* delta, int64_t M, int64_t N, int64_t rows_per_label, int activation, int mode,
                     int dtype, cudaStream_t stream) {
  if (M * N == 0) return;
  constexpr int threads = 256;
  LPA_DISPATCH(dtype, "linear_epilogue", {
    using A = acc_t<scalar_t>;
    const Epilogue<A> epi{static_cast<const A*>(bias), labels, static_cast<const A*>(delta), N, rows_per_label, activation, mode};
    linear_epilogue_kernel<scalar_t><<<grid_for(M * N, threads), threads, 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<scalar_t*>(preact), static_cast<const scalar_t*>(z), epi, M);
  })
  check_launch("linear_epilogue_kernel");
}

void linear_backward_epilogue(void* grad_preact, const void* grad_out, const void* preact, const int64_t* order,
                              const int64_t* offsets, const void* delta, int64_t K, int64_t B,
                              int64_t rows_per_label, int64_t N, int activation, int mode, int dtype,
                              int64_t splits, void* part_delta, void* part_bias, cudaStream_t stream) {
  // A sample's rows_per_label rows of N features form one "sample" of F = rows_per_label * N
  // features in the last-dim layout: group n collects column n of all its rows.
  const GroupShape s{rows_per_label * N, N, 1, rows_per_label};
  if (N == 0) return;
  LPA_DISPATCH(dtype, "linear_backward_epilogue", {
    using A = acc_t<scalar_t>;
    const LinearGrad<scalar_t> op{static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(preact),
                                  static_cast<const A*>(delta), static_cast<scalar_t*>(grad_preact), N, activation, mode};
    const bool aligned = aligned16(grad_out) && aligned16(grad_preact) && (preact == nullptr || aligned16(preact));
    launch_class_reduce<scalar_t>("linear_backward_epilogue", op, aligned, order, offsets, s, K, splits,
                                  static_cast<A*>(part_delta), static_cast<A*>(part_bias), stream);
  })
  check_launch("linear_backward_epilogue (class_reduce_kernel)");
}

}  // namespace lpa
