// The linear_perturb forward epilogue, shared by the wmma GEMM and the epilogue-only kernel
// (linear_perturb.cu) and the CUTLASS sm90a GEMM (linear_perturb_sm90.cu): the activations with their
// derivatives, and the per-element bias / activation / class perturbation.
#pragma once

#include "common.cuh"

namespace lpa {

// act(z), and its derivative in *slope, as torch computes them (gelu: erf form; gelu_tanh: tanh form).
template <typename A>
__device__ __forceinline__ A activate(A z, int activation, A* slope) {
  switch (activation) {
    case kRelu:  // torch's threshold_backward passes the gradient where z <= 0 is false (NaN included)
      *slope = z <= A(0) ? A(0) : A(1);
      return z > A(0) || z != z ? z : A(0);
    case kGelu: {
      const A cdf = A(0.5) * (A(1) + erf(z * A(0.70710678118654752440)));
      *slope = cdf + z * exp(A(-0.5) * z * z) * A(0.39894228040143267794);
      return z * cdf;
    }
    case kGeluTanh: {
      const A beta = A(0.79788456080286535588), kappa = A(0.044715);
      const A t = tanh(beta * (z + kappa * z * z * z));
      *slope = A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * beta * (A(1) + A(3) * kappa * z * z);
      return A(0.5) * z * (A(1) + t);
    }
    case kSilu: {
      const A s = A(1) / (A(1) + exp(-z));
      *slope = s * (A(1) + z * (A(1) - s));
      return z * s;
    }
    default:
      *slope = A(1);
      return z;
  }
}

// Everything after the product: z = product + bias[n] (saved as preact when asked), then
// act(z) + delta[y, n] (add) or act(z) * (1 + delta[y, n]) (scale), y = labels[m / rows_per_label].
template <typename A>
struct Epilogue {
  const A* bias;  // (N,) or null
  const int64_t* labels;
  const A* delta;  // (K, N)
  int64_t N, rows_per_label;
  int activation, mode;

  // Row m's class row of delta: one label read and one division per row, not per element.
  __device__ const A* delta_row(int64_t m) const { return delta + labels[m / rows_per_label] * N; }

  // z = product + bias[n], what preact holds.
  __device__ A preact_of(A product, int64_t n) const { return product + (bias != nullptr ? bias[n] : A(0)); }

  // The output from z and the cell's delta d.
  __device__ A out_of(A z, A d) const {
    A slope;
    const A a = activate(z, activation, &slope);
    return mode == kAdd ? a + d : a * (A(1) + d);
  }

  // Output cell (m, n) from its product, with row m's delta_row.
  template <typename T>
  __device__ void apply_in_row(A product, const A* row_delta, int64_t m, int64_t n, T* out, T* preact) const {
    const A z = preact_of(product, n);
    const int64_t idx = m * N + n;
    if (preact != nullptr) preact[idx] = store_from<T>(z);
    out[idx] = store_from<T>(out_of(z, row_delta[n]));
  }

  template <typename T>
  __device__ void apply(A product, int64_t m, int64_t n, T* out, T* preact) const {
    apply_in_row(product, delta_row(m), m, n, out, preact);
  }
};

}  // namespace lpa
