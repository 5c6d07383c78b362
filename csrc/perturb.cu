// perturb forward (elementwise, 16-byte vectors) and backward (grad_h and the class sums in one pass).
#include "class_reduce.cuh"
#include "kernels.h"

namespace lpa {

// The position of flattened element e = b * F + f: its sample b, and feature f's group
// c = (f / inner) % D and offset q = f % inner. `next()` steps to e + 1 without dividing.
struct FeatureCursor {
  int64_t b, f, q, c;
  __device__ FeatureCursor(int64_t e, int64_t F, int64_t D, int64_t inner)
      : b(e / F), f(e % F), q((e % F) % inner), c(((e % F) / inner) % D) {}
  __device__ void next(int64_t F, int64_t D, int64_t inner) {
    if (++f == F) { f = 0; q = 0; c = 0; ++b; return; }
    if (++q == inner) { q = 0; if (++c == D) c = 0; }
  }
};

template <typename A>
__device__ __forceinline__ A perturbed(A x, A d, int mode) { return mode == kAdd ? x + d : x * (A(1) + d); }

// Thread t handles elements [V * t, V * t + V) with one V-wide load and store (V = 16 bytes / size
// of T when h and out are 16-byte aligned, else 1); the last n % V elements go one per thread.
template <typename T, typename TD, int V>
__global__ void perturb_forward_kernel(T* __restrict__ out, const T* __restrict__ h, const int64_t* __restrict__ labels,
                                       const TD* __restrict__ delta, int64_t n, int64_t F, int64_t D, int64_t inner,
                                       int mode) {
  using A = acc_t<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < n / V; v += stride) {
    FeatureCursor at(v * V, F, D, inner);
    const Vec<T, V> x = reinterpret_cast<const Vec<T, V>*>(h)[v];
    Vec<T, V> y;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = load_as_acc(delta[labels[at.b] * D + at.c]);
      y.v[j] = store_from<T>(perturbed(load_as_acc(x.v[j]), A(d), mode));
      at.next(F, D, inner);
    }
    reinterpret_cast<Vec<T, V>*>(out)[v] = y;
  }
  const int64_t e = n / V * V + first;
  if (e < n) {
    const FeatureCursor at(e, F, D, inner);
    const A d = load_as_acc(delta[labels[at.b] * D + at.c]);
    out[e] = store_from<T>(perturbed(load_as_acc(h[e]), A(d), mode));
  }
}

template <typename T, typename TD>
void launch_perturb_forward(void* out, const void* h, const int64_t* labels, const void* delta, int64_t B, int64_t F,
                            int64_t D, int64_t inner, int mode, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t n = B * F;
  auto o = static_cast<T*>(out);
  auto x = static_cast<const T*>(h);
  auto d = static_cast<const TD*>(delta);
  if (aligned16(out) && aligned16(h)) {
    constexpr int V = kVec<T>;
    perturb_forward_kernel<T, TD, V><<<grid_for(n / V + 1, threads), threads, 0, stream>>>(o, x, labels, d, n, F, D, inner, mode);
  } else {
    perturb_forward_kernel<T, TD, 1><<<grid_for(n, threads), threads, 0, stream>>>(o, x, labels, d, n, F, D, inner, mode);
  }
  check_launch("perturb_forward_kernel");
}

// Elementwise part of the perturb backward: grad_h = grad_out (add) or grad_out * (1 + d) (scale),
// and the class sum of grad_out (add) or grad_out * h (scale).
template <typename T, typename TD>
struct PerturbGrad {
  using A = acc_t<T>;
  const T* grad_out;
  const T* h;
  const TD* delta;
  T* grad_h;
  int64_t D;
  int mode;

  __device__ A class_state(int64_t c, int64_t k) const { return delta != nullptr ? A(load_as_acc(delta[c * D + k])) : A(0); }

  template <int V>
  __device__ void element(int64_t idx, const A (&d)[V], A (&sum)[V], A (&)[V]) const {
    const Vec<T, V> g = load_vec<V>(grad_out, idx);
    Vec<T, V> x, gh;
    if (mode == kScale) x = load_vec<V>(h, idx);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A gj = load_as_acc(g.v[j]);
      gh.v[j] = store_from<T>(mode == kAdd ? gj : gj * (A(1) + d[j]));
      sum[j] += mode == kAdd ? gj : gj * load_as_acc(x.v[j]);
    }
    if (grad_h != nullptr) store_vec<V>(grad_h, idx, gh);
  }
};

template <typename T, typename TD>
void launch_perturb_backward(void* grad_h, const void* grad_out, const void* h, const int64_t* order,
                             const int64_t* offsets, const void* delta, int64_t K, const GroupShape& s, int mode,
                             int64_t splits, void* part, cudaStream_t stream) {
  using A = acc_t<T>;
  const PerturbGrad<T, TD> op{static_cast<const T*>(grad_out), static_cast<const T*>(h), static_cast<const TD*>(delta),
                              static_cast<T*>(grad_h), s.D, mode};
  const bool aligned = aligned16(grad_out) && (h == nullptr || aligned16(h)) && (grad_h == nullptr || aligned16(grad_h));
  launch_class_reduce<T>("perturb_backward", op, aligned, order, offsets, s, K, splits, static_cast<A*>(part),
                         static_cast<A*>(nullptr), stream);
  check_launch("perturb_backward (class_reduce_kernel)");
}

void perturb_forward(void* out, const void* h, const int64_t* labels, const void* delta, int64_t B, int64_t F,
                     int64_t D, int64_t inner, int mode, int dtype, int delta_dtype, cudaStream_t stream) {
  if (B * F == 0) return;
  LPA_DISPATCH(dtype, "perturb_forward", {
    if (delta_dtype == dtype) launch_perturb_forward<scalar_t, scalar_t>(out, h, labels, delta, B, F, D, inner, mode, stream);
    else launch_perturb_forward<scalar_t, acc_t<scalar_t>>(out, h, labels, delta, B, F, D, inner, mode, stream);
  })
}

void perturb_backward(void* grad_h, const void* grad_out, const void* h, const int64_t* order,
                      const int64_t* offsets, const void* delta, int64_t K, int64_t F, int64_t D, int64_t inner,
                      int mode, int dtype, int delta_dtype, int64_t splits, void* part, cudaStream_t stream) {
  const GroupShape s{F, D, inner, F / (D * inner)};
  LPA_DISPATCH(dtype, "perturb_backward", {
    if (delta_dtype == dtype) launch_perturb_backward<scalar_t, scalar_t>(grad_h, grad_out, h, order, offsets, delta, K, s, mode, splits, part, stream);
    else launch_perturb_backward<scalar_t, acc_t<scalar_t>>(grad_h, grad_out, h, order, offsets, delta, K, s, mode, splits, part, stream);
  })
}

}  // namespace lpa
