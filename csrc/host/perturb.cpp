// perturb: perturb/naive.py's forward (h + delta[y] or h * (1 + delta[y])) and its class gradient, on the
// kernels' layout (_common.delta_layout): a sample's F features are `reps` repeats of D blocks of `inner`
// consecutive features, block k reading delta[y, k].
#include <cstddef>
#include <vector>

#include "host_kernels.h"

namespace lpa_host {
namespace {

// One sample: out (F) from x (F) and its class row d (D). The inner == 1 loop is the vectorised common case
// (full and last-dim layouts).
template <typename T>
LPA_HOST_CLONES
void perturb_row(const T* x, const T* d, T* out, int64_t reps, int64_t D, int64_t inner, bool scale) {
  for (int64_t r = 0; r < reps; ++r) {
    if (inner == 1) {
      if (scale)
        for (int64_t k = 0; k < D; ++k) out[k] = x[k] * (T(1) + d[k]);
      else
        for (int64_t k = 0; k < D; ++k) out[k] = x[k] + d[k];
    } else {
      for (int64_t k = 0; k < D; ++k) {
        const T v = scale ? T(1) + d[k] : d[k];
        const T* xk = x + k * inner;
        T* ok = out + k * inner;
        if (scale)
          for (int64_t i = 0; i < inner; ++i) ok[i] = xk[i] * v;
        else
          for (int64_t i = 0; i < inner; ++i) ok[i] = xk[i] + v;
      }
    }
    x += D * inner;
    out += D * inner;
  }
}

// One sample's contribution to its class row g (D), in double: each block's sum of grad (times x for scale),
// in order. A class sums up to B * F / D terms one after another: in float32 that lost 15-35x the accuracy of
// PyTorch's (pairwise) sums at B 8, F 3 x 224 x 224 channel-wise (found by fuzzing); double keeps it.
template <typename T>
LPA_HOST_CLONES
void class_grad_row(const T* grad, const T* x, double* g, int64_t reps, int64_t D, int64_t inner, bool scale) {
  for (int64_t r = 0; r < reps; ++r) {
    if (inner == 1) {
      if (scale)
        for (int64_t k = 0; k < D; ++k) g[k] += double(grad[k]) * double(x[k]);
      else
        for (int64_t k = 0; k < D; ++k) g[k] += double(grad[k]);
    } else {
      for (int64_t k = 0; k < D; ++k) {
        const T* gk = grad + k * inner;
        double total = 0;
        if (scale) {
          const T* xk = x + k * inner;
          for (int64_t i = 0; i < inner; ++i) total += double(gk[i]) * double(xk[i]);
        } else {
          for (int64_t i = 0; i < inner; ++i) total += double(gk[i]);
        }
        g[k] += total;
      }
    }
    grad += D * inner;
    if (scale) x += D * inner;
  }
}

}  // namespace

template <typename T, typename Label>
void perturb_forward(const T* h, const Label* labels, const T* delta, T* out, int64_t B, int64_t F, int64_t D,
                     int64_t inner, bool scale) {
  const int64_t reps = D * inner == 0 ? 0 : F / (D * inner);  // F == 0: an empty sample
  for (int64_t b = 0; b < B; ++b)
    perturb_row(h + b * F, delta + static_cast<int64_t>(labels[b]) * D, out + b * F, reps, D, inner, scale);
}

template <typename T, typename Label>
void perturb_class_grad(const T* grad_out, const T* h, const Label* labels, T* grad_delta, int64_t B, int64_t F,
                        int64_t K, int64_t D, int64_t inner, bool scale, T grad_scale) {
  const int64_t reps = D * inner == 0 ? 0 : F / (D * inner);  // F == 0: an empty sample
  std::vector<double> sums(static_cast<size_t>(K * D), 0.0);
  for (int64_t b = 0; b < B; ++b)
    class_grad_row(grad_out + b * F, scale ? h + b * F : nullptr, sums.data() + static_cast<int64_t>(labels[b]) * D,
                   reps, D, inner, scale);
  // rounded to T, then scaled in T: as a multiplication of the summed gradient would
  for (int64_t i = 0; i < K * D; ++i) grad_delta[i] = T(sums[i]) * grad_scale;
}

#define LPA_HOST_PERTURB(T, Label)                                                                                 \
  template void perturb_forward<T, Label>(const T*, const Label*, const T*, T*, int64_t, int64_t, int64_t,       \
                                          int64_t, bool);                                                         \
  template void perturb_class_grad<T, Label>(const T*, const T*, const Label*, T*, int64_t, int64_t, int64_t,    \
                                             int64_t, int64_t, bool, T);
LPA_HOST_PERTURB(float, int32_t)
LPA_HOST_PERTURB(float, int64_t)
LPA_HOST_PERTURB(double, int32_t)
LPA_HOST_PERTURB(double, int64_t)
#undef LPA_HOST_PERTURB

}  // namespace lpa_host
