// head_sample_grad: the per-sample half of one head_pgd step (lpa_kernels/head_pgd/op.py).
//
// For logits = h~ @ W^T + b and summed cross-entropy, sample b's gradient with respect to its
// perturbed activations is softmax(logits_b) @ W - W[y_b]; with respect to delta[y_b] it is that
// (add) or that times h_b (scale). One block per sample writes this row of D values to a (B, D)
// workspace, without ever storing the K logits: the block walks the classes in chunks of
// kClassSlots, computes their logits (h~ = h + delta[y] or h * (1 + delta[y]) applied on load), and
// keeps an online softmax (running max and sum, flash-attention style): the row accumulator
// sum_c exp(logit_c - max) W[c] is rescaled whenever the max grows. The class-summed gradient is then
// the existing deterministic class reduction of these rows, and the update the existing pgd_step (the
// Python launcher chains the three), so no sum here depends on the scheduling: results are bitwise
// reproducible.
//
// Block layout (kLanes x kClassSlots threads): for the logits, threadIdx.y picks one class of the chunk
// and threadIdx.x strides over D (a warp reads one row of W, coalesced), the lanes' partial dot
// products being added in a fixed tree order in shared memory. For the accumulator, the block's
// threads are flattened and each owns the columns j = t, t + kHeadThreads, ... of the sample's
// workspace row (coalesced W reads again); a column is only ever touched by its owner, so the row
// needs no synchronisation. Plain FMA in fp32 (fp64 for fp64 data): linf PGD takes the sign of each
// gradient entry, which 16-bit or TF32 products would flip where the reference does not.
#include "common.cuh"
#include "kernels.h"

#include <cmath>

namespace lpa {

constexpr int kLanes = 32;
constexpr int kClassSlots = 8;
constexpr int kHeadThreads = kLanes * kClassSlots;

template <typename T>
__global__ void __launch_bounds__(kHeadThreads)
head_sample_grad_kernel(acc_t<T>* sample_grad, acc_t<T>* p_true, const T* h, const int64_t* labels, const T* weight,
                        const acc_t<T>* bias, const acc_t<T>* delta, int64_t K, int64_t D, int mode) {
  using A = acc_t<T>;
  __shared__ A scratch[kHeadThreads];
  const int64_t b = blockIdx.x, y = labels[b];
  const int lane = threadIdx.x, slot = threadIdx.y, t = slot * kLanes + lane;
  const T* h_row = h + b * D;
  const A* delta_row = delta + y * D;
  A* row = sample_grad + b * D;  // sum_c exp(logit_c - row_max) W[c], then the sample's gradient

  for (int64_t j = t; j < D; j += kHeadThreads) row[j] = A(0);
  A row_max = -INFINITY, row_sum = 0, true_logit = 0;
  for (int64_t c0 = 0; c0 < K; c0 += kClassSlots) {
    // Logit of class c0 + slot: the lanes' partial dot products, summed over the lanes in shared memory.
    const int64_t c = c0 + slot;
    A partial = 0;
    if (c < K) {
      const T* w_row = weight + c * D;
      for (int64_t j = lane; j < D; j += kLanes) {
        const A x = load_as_acc(h_row[j]);
        const A x_tilde = mode == kAdd ? x + delta_row[j] : x * (A(1) + delta_row[j]);
        partial += x_tilde * load_as_acc(w_row[j]);
      }
    }
    scratch[t] = partial;
    __syncthreads();
    for (int half = kLanes / 2; half > 0; half /= 2) {
      if (lane < half) scratch[t] += scratch[t + half];
      __syncthreads();
    }
    // Every thread reads the chunk's logits (missing classes past K: -inf, weight 0).
    A logits[kClassSlots], chunk_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < kClassSlots; ++s) {
      const int64_t cs = c0 + s;
      logits[s] = cs < K ? scratch[s * kLanes] + (bias != nullptr ? bias[cs] : A(0)) : A(-INFINITY);
      chunk_max = nan_max(chunk_max, logits[s]);
      if (cs == y) true_logit = logits[s];
    }
    __syncthreads();  // scratch is overwritten by the next chunk

    // Online softmax: the first chunk holds a real class, so new_max is finite and
    // exp(-inf - new_max) = 0 scales the empty start away.
    const A new_max = nan_max(row_max, chunk_max);
    const A rescale = exp(row_max - new_max);
    A weights[kClassSlots], chunk_sum = 0;
#pragma unroll
    for (int s = 0; s < kClassSlots; ++s) {
      weights[s] = exp(logits[s] - new_max);
      chunk_sum += weights[s];
    }
    row_sum = row_sum * rescale + chunk_sum;
    row_max = new_max;
    const int classes = static_cast<int>(min64(kClassSlots, K - c0));
    for (int64_t j = t; j < D; j += kHeadThreads) {
      A value = row[j] * rescale;
#pragma unroll  // a constant trip count keeps weights[] in registers
      for (int s = 0; s < kClassSlots; ++s) {
        if (s < classes) value += weights[s] * load_as_acc(weight[(c0 + s) * D + j]);
      }
      row[j] = value;
    }
  }

  // d loss / d h~ = softmax @ W - W[y]; d h~ / d delta[y] is 1 (add) or h (scale).
  const T* w_true = weight + y * D;
  for (int64_t j = t; j < D; j += kHeadThreads) {
    const A g = row[j] / row_sum - load_as_acc(w_true[j]);
    row[j] = mode == kAdd ? g : g * load_as_acc(h_row[j]);
  }
  if (p_true != nullptr && t == 0) p_true[b] = exp(true_logit - row_max) / row_sum;
}

void head_sample_grad(void* sample_grad, void* p_true, const void* h, const int64_t* labels, const void* weight,
                      const void* bias, const void* delta, int64_t B, int64_t K, int64_t D, int mode, int dtype,
                      cudaStream_t stream) {
  if (B > 2147483647LL) throw std::invalid_argument("head_sample_grad: more than 2^31 - 1 samples");
  LPA_DISPATCH(dtype, "head_sample_grad", {
    using A = acc_t<scalar_t>;
    head_sample_grad_kernel<scalar_t><<<static_cast<unsigned>(B), dim3(kLanes, kClassSlots), 0, stream>>>(
        static_cast<A*>(sample_grad), static_cast<A*>(p_true), static_cast<const scalar_t*>(h), labels,
        static_cast<const scalar_t*>(weight), static_cast<const A*>(bias), static_cast<const A*>(delta), K, D, mode);
  })
  check_launch("head_sample_grad_kernel");
}

}  // namespace lpa
