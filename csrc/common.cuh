// Shared pieces of the lpa_kernels CUDA kernels: dtype codes and conversions, NaN-propagating
// min/max, 16-byte vector access, block reductions, and the error type the bindings turn into a
// Python exception.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

#include <string>
#include <type_traits>

namespace lpa {

// Dtype codes shared with lpa_kernels/_cuda_launch.py (DTYPE_CODES there).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Activation codes (ACTIVATION_CODES in _cuda_launch.py) and modes.
enum Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };
enum Mode : int { kAdd = 0, kScale = 1 };
enum Norm : int { kLinf = 0, kL2 = 1 };

inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw LaunchError(std::string(kernel) + ": " + cudaGetErrorString(err));
  }
}

// Arithmetic type: float for the 16/32-bit storage types, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename T> __device__ __forceinline__ acc_t<T> load_as_acc(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<acc_t<T>>(v);
}

// Rounds once to the storage type T (a double reaches the 16-bit types through float).
template <typename T, typename A> __device__ __forceinline__ T store_from(A v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// torch.minimum / torch.maximum semantics: a NaN operand gives NaN (fminf/fmaxf would drop it).
template <typename A> __device__ __forceinline__ A nan_min(A a, A b) { return (a != a || b != b) ? a + b : (a < b ? a : b); }
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
// torch.sign: -1, 0, +1, NaN for NaN.
// head_pgd_'s class-space sums, stored as T, are scaled by this per class (n its sample count) when T is
// float16: the largest power of two not above n, inverted (1 for n <= 1), so that a class's sums lie in
// [-2, 2] and stay finite whatever n; exact, so the rounded sums are the unscaled ones times a power of two.
// Other dtypes hold any count unscaled, and so keep the L2 step's 1e-12 acting on the sums as defined.
template <typename T, typename A> __device__ __forceinline__ A class_sum_scale(int64_t n) {
  if constexpr (std::is_same_v<T, __half>) return ldexp(A(1), -ilogb(static_cast<double>(n > 1 ? n : 1)));
  else return A(1);
}
template <typename A> __device__ __forceinline__ A sign_of(A v) { return v > A(0) ? A(1) : (v < A(0) ? A(-1) : v * A(0)); }

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// V elements loaded or stored with one instruction (16 bytes when V == kVec<T>).
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// `combine` of `value` over a block of `blockDim.x * blockDim.y` threads, reduced in a fixed tree order
// (deterministic). `scratch` holds one slot per thread. Every thread gets the result.
template <typename A, typename Combine>
__device__ A block_reduce(A value, A* scratch, Combine combine) {
  const int n = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  scratch[t] = value;
  __syncthreads();
  for (int half = n / 2; half > 0; half /= 2) {  // blockDim products are powers of two
    if (t < half) scratch[t] = combine(scratch[t], scratch[t + half]);
    __syncthreads();
  }
  A total = scratch[0];
  __syncthreads();
  return total;
}

template <typename A>
__device__ A block_sum(A value, A* scratch) {
  return block_reduce(value, scratch, [](A a, A b) { return a + b; });
}

// The largest value over the block; NaN if any thread holds NaN.
template <typename A>
__device__ A block_max(A value, A* scratch) {
  return block_reduce(value, scratch, [](A a, A b) { return nan_max(a, b); });
}

// Dispatch on a dtype code: runs `body` with `scalar_t` bound to the storage type.
#define LPA_DISPATCH(code, name, ...)                                                           \
  switch (code) {                                                                              \
    case ::lpa::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }                      \
    case ::lpa::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }                     \
    case ::lpa::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }             \
    case ::lpa::kFloat64: { using scalar_t = double; __VA_ARGS__; break; }                     \
    default: throw std::invalid_argument(std::string(name) + ": unsupported dtype code " + std::to_string(code)); \
  }

}  // namespace lpa
