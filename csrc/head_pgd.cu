// softmax_xent_grad: the row-wise part of one head_pgd step (lpa_kernels/head_pgd/loop.py, which runs
// the GEMMs through cuBLAS and the class sums through the class reduction of perturb's backward).
//
// out[b, k] = softmax(z_b)[k] - [k == y_b], with z_b = logits[b] + shift[y_b] (shift (K, K) may be null),
// and p_true[b] = softmax(z_b)[y_b] when p_true is not null.
//
// Block layout (lanes x rows = kBlockThreads threads): row b = blockIdx.x * blockDim.y + threadIdx.y is
// handled by the blockDim.x lanes of one threadIdx.y, each striding over the K columns (coalesced). The
// launcher gives a row 32 lanes for small K and the whole block (256) for large K, where one warp per
// row would leave most of the GPU idle on a chunk of a few thousand rows.
// Pass 1: each lane keeps a running maximum and the sum of exp(z - max) over its columns, rescaled when
// the maximum grows (online softmax); the lanes' maxima, then their rescaled sums, are combined in a
// fixed tree order in shared memory (deterministic). Pass 2 writes the probabilities minus the one-hot
// term. out may alias logits: every element is read before it is written, by the thread that writes it.
#include "common.cuh"
#include "kernels.h"

#include <cmath>

namespace lpa {

constexpr int kBlockThreads = 256;
constexpr int64_t kWideRow = 2048;  // from this many classes on, a row gets the whole block

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

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
softmax_xent_grad_kernel(T* out, acc_t<T>* p_true, const T* logits, const T* shift, const int64_t* labels,
                         int64_t B, int64_t K) {
  using A = acc_t<T>;
  __shared__ A scratch[kBlockThreads];
  const int lane = threadIdx.x, lanes = blockDim.x;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = b < B;
  const int64_t y = live ? labels[b] : 0;
  const T* z_row = logits + (live ? b : 0) * K;
  const T* shift_row = shift != nullptr ? shift + y * K : nullptr;
  auto z = [&](int64_t k) { return load_as_acc(z_row[k]) + (shift_row != nullptr ? load_as_acc(shift_row[k]) : A(0)); };

  // Pass 1: per-lane online maximum and sum. A lane with no finite logit yet has max -inf and sum 0;
  // a NaN logit makes the sum NaN, and so the whole row (as torch's softmax does).
  A lane_max = -INFINITY, lane_sum = 0, true_logit = 0;
  if (live) {
    for (int64_t k = lane; k < K; k += lanes) {
      const A v = z(k);
      if (k == y) true_logit = v;  // kept by the lane that owns column y, read before anything is written
      if (v > lane_max) {
        lane_sum = lane_sum * exp(lane_max - v) + A(1);
        lane_max = v;
      } else if (v != -INFINITY) {
        lane_sum += exp(v - lane_max);
      }
    }
  }
  const A row_max = row_combine(lane_max, scratch, [](A a, A c) { return nan_max(a, c); });
  const A pivot = row_max == -INFINITY ? A(0) : row_max;
  const A rescaled = lane_sum == A(0) ? A(0) : lane_sum * exp(lane_max - pivot);
  const A row_sum = row_combine(rescaled, scratch, [](A a, A c) { return a + c; });
  if (!live) return;  // after the last __syncthreads

  const A inv_sum = A(1) / row_sum;
  T* out_row = out + b * K;
  for (int64_t k = lane; k < K; k += lanes) {
    const A p = exp(z(k) - pivot) * inv_sum;
    out_row[k] = store_from<T>(k == y ? p - A(1) : p);
  }
  if (p_true != nullptr && y % lanes == lane) p_true[b] = exp(true_logit - pivot) * inv_sum;
}

void softmax_xent_grad(void* out, void* p_true, const void* logits, const void* shift, const int64_t* labels, int64_t B,
                       int64_t K, int dtype, cudaStream_t stream) {
  const int lanes = K >= kWideRow ? kBlockThreads : 32, rows = kBlockThreads / lanes;
  const int64_t blocks = (B + rows - 1) / rows;
  if (blocks > 2147483647LL) throw std::invalid_argument("softmax_xent_grad: too many rows");
  if (blocks == 0) return;
  LPA_DISPATCH(dtype, "softmax_xent_grad", {
    softmax_xent_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), dim3(lanes, rows), 0, stream>>>(
        static_cast<scalar_t*>(out), static_cast<acc_t<scalar_t>*>(p_true), static_cast<const scalar_t*>(logits),
        static_cast<const scalar_t*>(shift), labels, B, K);
  })
  check_launch("softmax_xent_grad_kernel");
}

}  // namespace lpa
