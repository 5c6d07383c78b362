// softmax_xent_grad: the row-wise part of one rows-form head_pgd step (lpa_kernels/head_pgd/loop.py, which
// runs the GEMMs through cuBLAS and the class sums and update through pgd's class_grad_pgd_step).
//
// out[b, k] = softmax(logits[b])[k] - [k == y_b], and p_true[b] = softmax(logits[b])[y_b] when p_true is
// not null.
//
// Block layout (lanes x rows = kBlockThreads threads): row b = blockIdx.x * blockDim.y + threadIdx.y is
// handled by the blockDim.x lanes of one threadIdx.y, each striding over the K columns (coalesced). The
// launcher gives a row 32 lanes for small K and the whole block (256) for large K, where one warp per
// row would leave most of the GPU idle on a chunk of a few thousand rows.
// Pass 1: each lane keeps a running maximum and the sum of exp(z - max) over its columns, rescaled when
// the maximum grows (online softmax); the lanes' maxima, then their rescaled sums, are combined in a
// fixed tree order in shared memory (deterministic). Pass 2 writes the probabilities minus the one-hot
// term. out may alias logits: every element is read before it is written, by the thread that writes it.
// Rows whose length is a multiple of 16 bytes go through 16-byte vector loads and stores.
//
// softmax_class_sum: the class-space step of head_pgd fused (loop.py's HeadKernels.softmax_class_sum):
// sums[c, k] = (sum over class c's samples b of softmax(logits[b] + shift[c])[k] - [k == c] * n_c) times
// class_sum_scale(n_c) (common.cuh: a power of two that keeps 16-bit sums finite; the update's direction
// does not depend on a class's scale), and p_true[b] when p_true is not null. One block per class c walks its samples in the label plan's order
// (order[starts[c]:starts[c + 1]]): phase 1 gives each sample the softmax_xent_grad row layout above
// (lanes x rows, fixed-order combinations) and writes its pivot and 1 / sum into scratch (2, B); after
// a block barrier, phase 2 gives each thread columns k, k + 256, ... and sums exp(z - pivot) / sum over
// the class's samples in order (deterministic). Every row of sums is written (absent classes: zeros),
// so no zero fill, no (B, K) probabilities and no separate class reduction.
#include "common.cuh"
#include "kernels.h"
#include "row_softmax.cuh"

namespace lpa {

constexpr int kBlockThreads = 256;
constexpr int64_t kWideRow = 2048;  // from this many classes on, a row gets the whole block

// V = kVec<T> (16-byte loads and stores) when K is a multiple of it and the rows are 16-byte aligned,
// else 1. A lane then owns the V consecutive columns k0..k0+V-1 of each vector it visits.
template <typename T, int V>
__global__ void __launch_bounds__(kBlockThreads)
softmax_xent_grad_kernel(T* out, acc_t<T>* p_true, const T* logits, const int64_t* labels, int64_t B, int64_t K) {
  using A = acc_t<T>;
  using Vector = Vec<T, V>;
  __shared__ A scratch[kBlockThreads];
  const int lane = threadIdx.x, lanes = blockDim.x;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = b < B;
  const int64_t y = live ? labels[b] : 0;
  const Vector* z_row = reinterpret_cast<const Vector*>(logits + (live ? b : 0) * K);
  const int64_t vectors = K / V;

  // Pass 1: per-lane online maximum and sum; the true class's logit kept by the lane that owns it.
  A lane_max = -INFINITY, lane_sum = 0, true_logit = 0;
  if (live) {
    for (int64_t j = lane; j < vectors; j += lanes) {
      const Vector raw = z_row[j];
      for (int i = 0; i < V; ++i) {
        const A v = load_as_acc(raw.v[i]);
        if (j * V + i == y) true_logit = v;
        online_add(v, lane_max, lane_sum);
      }
    }
  }
  A pivot, inv_sum;
  row_softmax_stats(lane_max, lane_sum, scratch, pivot, inv_sum);
  if (!live) return;  // after the last __syncthreads

  // Pass 2: every element is read (pass 1 and here) before this thread writes it, so out may be logits.
  Vector* out_row = reinterpret_cast<Vector*>(out + b * K);
  for (int64_t j = lane; j < vectors; j += lanes) {
    const Vector raw = z_row[j];
    Vector result;
    for (int i = 0; i < V; ++i) {
      const A p = exp(load_as_acc(raw.v[i]) - pivot) * inv_sum;
      result.v[i] = store_from<T>(j * V + i == y ? p - A(1) : p);
    }
    out_row[j] = result;
  }
  if (p_true != nullptr && (y / V) % lanes == lane) p_true[b] = exp(true_logit - pivot) * inv_sum;
}

template <typename T, int V>
void launch_softmax_xent_grad(void* out, void* p_true, const void* logits, const int64_t* labels, int64_t B, int64_t K,
                              unsigned blocks, dim3 block, cudaStream_t stream) {
  softmax_xent_grad_kernel<T, V><<<blocks, block, 0, stream>>>(
      static_cast<T*>(out), static_cast<acc_t<T>*>(p_true), static_cast<const T*>(logits), labels, B, K);
}

void softmax_xent_grad(void* out, void* p_true, const void* logits, const int64_t* labels, int64_t B, int64_t K,
                       int dtype, cudaStream_t stream) {
  const int lanes = K >= kWideRow ? kBlockThreads : 32, rows = kBlockThreads / lanes;
  const int64_t blocks = (B + rows - 1) / rows;
  if (blocks > 2147483647LL) throw std::invalid_argument("softmax_xent_grad: too many rows");
  if (blocks == 0) return;
  const bool aligned = aligned16(out) && aligned16(logits);
  LPA_DISPATCH(dtype, "softmax_xent_grad", {
    constexpr int V = kVec<scalar_t>;
    if (aligned && K % V == 0) {
      launch_softmax_xent_grad<scalar_t, V>(out, p_true, logits, labels, B, K, static_cast<unsigned>(blocks),
                                            dim3(lanes, rows), stream);
    } else {
      launch_softmax_xent_grad<scalar_t, 1>(out, p_true, logits, labels, B, K, static_cast<unsigned>(blocks),
                                            dim3(lanes, rows), stream);
    }
  })
  check_launch("softmax_xent_grad_kernel");
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
softmax_class_sum_kernel(T* sums, acc_t<T>* p_true, acc_t<T>* scratch, const T* logits, const T* shift,
                         const int64_t* order, const int64_t* starts, int64_t B, int64_t K) {
  using A = acc_t<T>;
  __shared__ A combine_scratch[kBlockThreads];
  const int64_t c = blockIdx.x, start = starts[c], end = starts[c + 1];
  const T* shift_row = shift + c * K;
  const int lane = threadIdx.x, lanes = blockDim.x;

  // Phase 1: blockDim.y samples at a time; every thread runs the same number of rounds (row_combine
  // holds __syncthreads), rounds past the class's end contribute nothing.
  for (int64_t first = start; first < end; first += blockDim.y) {
    const int64_t i = first + threadIdx.y;
    const bool live = i < end;
    const T* z_row = logits + (live ? order[i] : 0) * K;
    A lane_max = -INFINITY, lane_sum = 0;
    if (live) {
      for (int64_t k = lane; k < K; k += lanes) {
        online_add(load_as_acc(z_row[k]) + load_as_acc(shift_row[k]), lane_max, lane_sum);
      }
    }
    A pivot, inv_sum;
    row_softmax_stats(lane_max, lane_sum, combine_scratch, pivot, inv_sum);
    if (live && lane == 0) {
      scratch[i] = pivot;
      scratch[B + i] = inv_sum;
      if (p_true != nullptr) {
        p_true[order[i]] = exp(load_as_acc(z_row[c]) + load_as_acc(shift_row[c]) - pivot) * inv_sum;
      }
    }
  }
  __syncthreads();  // phase 2 reads the scratch other threads of the block wrote

  // Phase 2: thread t sums its columns over the class's samples, in order, scaled by class_sum_scale.
  const A scale = class_sum_scale<T, A>(end - start);
  for (int64_t k = threadIdx.y * lanes + lane; k < K; k += kBlockThreads) {
    const A offset = load_as_acc(shift_row[k]);
    A total = 0;
    for (int64_t i = start; i < end; ++i) {
      total += exp(load_as_acc(logits[order[i] * K + k]) + offset - scratch[i]) * scratch[B + i];
    }
    sums[c * K + k] = store_from<T>((k == c ? total - A(end - start) : total) * scale);
  }
}

void softmax_class_sum(void* sums, void* p_true, void* scratch, const void* logits, const void* shift,
                       const int64_t* order, const int64_t* starts, int64_t B, int64_t K, int dtype,
                       cudaStream_t stream) {
  if (K > 2147483647LL) throw std::invalid_argument("softmax_class_sum: too many classes");
  if (K == 0) return;
  const int lanes = K >= kWideRow ? kBlockThreads : 32, rows = kBlockThreads / lanes;
  LPA_DISPATCH(dtype, "softmax_class_sum", {
    softmax_class_sum_kernel<scalar_t><<<static_cast<unsigned>(K), dim3(lanes, rows), 0, stream>>>(
        static_cast<scalar_t*>(sums), static_cast<acc_t<scalar_t>*>(p_true), static_cast<acc_t<scalar_t>*>(scratch),
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(shift), order, starts, B, K);
  })
  check_launch("softmax_class_sum_kernel");
}

}  // namespace lpa
