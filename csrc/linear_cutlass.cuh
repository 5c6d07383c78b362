// What the CUTLASS linear_perturb GEMMs (linear_perturb_sm90.cu, linear_perturb_sm80.cu) share: our
// collective epilogue (bias, activation, class add/scale and preact from the accumulator registers,
// through linear_epilogue.cuh), the operand strides, and the host launcher. Included only when the
// CUTLASS headers are on the include path (LPA_WITH_CUTLASS).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include <string>

#include "linear_epilogue.cuh"

namespace lpa {
namespace cutlass_gemm {  // named, not anonymous: the kernels' demangled names must parse (lpa_bench.static)

// Row-major (rows, cols, batch) strides: cols contiguous. x is (M, K); W (N, K) is the B operand
// K-major (CUTLASS's "column-major B"), so both operands reach the tensor cores without a transpose.
using RowStride = cute::Stride<int64_t, cute::Int<1>, int64_t>;

// The collective epilogue (the interface of cutlass::epilogue::collective::DefaultEpilogue, run by the
// threads that hold the accumulators after each tile's mainloop): every accumulator element goes through
// Epilogue::apply_in_row at its (m, n), found by partitioning the tile's coordinates like the
// accumulators. Cells outside (M, N) (ragged last tiles, whose operands the mainloops read as zeros)
// are skipped. No shared memory, so the mainloop keeps all of it for its stages.
template <typename T>
class LinearPerturbEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::NoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  // Type facts the kernel and the device adapter read; the D/C/thread-op types are never used to store.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<T, 1, float, float>;
  using ElementOutput = T;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using ElementC = T;
  using StrideC = RowStride;
  using ElementD = T;
  using StrideD = RowStride;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    Epilogue<float> epilogue;
    T* out;     // (M, N)
    T* preact;  // (M, N) or null
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.out != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit LinearPerturbEpilogue(Params const& params, SharedStorage const& = SharedStorage())
      : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    const int M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const auto tile_coord = make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl));
    // (m, n) of each of this thread's accumulators.
    Tensor tile_cells = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk), tile_coord);
    Tensor thread_cells = tiled_mma.get_thread_slice(thread_idx).partition_C(tile_cells);
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    CUTE_STATIC_ASSERT_V(size(thread_cells) == size(accumulators));

    // In the WGMMA and mma.sync accumulator layouts, accumulators 2j and 2j + 1 are adjacent columns of
    // one row: when both are in range and N is even, preact and out get one 32-bit store each (checked
    // per pair, on coordinates the compiler knows up to the thread's offset).
    static_assert(decltype(size(accumulators))::value % 2 == 0, "accumulators come in pairs");
    const Epilogue<float>& epi = params_.epilogue;
    int row = -1;
    const float* row_delta = nullptr;
    auto delta_of_row = [&](int m) {  // a thread's accumulators span few rows: look each label up once
      if (m != row) {
        row = m;
        row_delta = epi.delta_row(m);
      }
      return row_delta;
    };
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); i += 2) {
      const int m = get<0>(thread_cells(i)), n = get<1>(thread_cells(i));
      const int m1 = get<0>(thread_cells(i + 1)), n1 = get<1>(thread_cells(i + 1));
      if (m1 == m && n1 == n + 1 && N % 2 == 0 && n % 2 == 0 && m < M && n1 < N) {
        const float* d = delta_of_row(m);
        const float z0 = epi.preact_of(accumulators(i), n), z1 = epi.preact_of(accumulators(i + 1), n1);
        const int64_t idx = int64_t(m) * N + n;
        if (params_.preact != nullptr) store_pair(params_.preact + idx, z0, z1);
        store_pair(params_.out + idx, epi.out_of(z0, d[n]), epi.out_of(z1, d[n1]));
      } else {
        if (m < M && n < N) epi.apply_in_row(float(accumulators(i)), delta_of_row(m), m, n, params_.out, params_.preact);
        if (m1 < M && n1 < N) {
          epi.apply_in_row(float(accumulators(i + 1)), delta_of_row(m1), m1, n1, params_.out, params_.preact);
        }
      }
    }
  }

 private:
  // Two adjacent 16-bit cells in one 32-bit store (dst 4-byte aligned: even offset into an aligned tensor).
  CUTLASS_DEVICE static void store_pair(T* dst, float v0, float v1) {
    *reinterpret_cast<Vec<T, 2>*>(dst) = Vec<T, 2>{{store_from<T>(v0), store_from<T>(v1)}};
  }

  Params params_;
};

template <typename T> struct CutlassElement;
template <> struct CutlassElement<__half> { using type = cutlass::half_t; };
template <> struct CutlassElement<__nv_bfloat16> { using type = cutlass::bfloat16_t; };

inline int multiprocessors() {
  int device = 0;
  cudaGetDevice(&device);
  return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
}

// One GEMM: Gemm<T>::Device is a cutlass::gemm::device::GemmUniversalAdapter whose epilogue arguments
// are LinearPerturbEpilogue<T>::Arguments.
template <template <typename> class Gemm, typename T>
void run(const char* name, T* out, T* preact, const T* x, const T* weight, const Epilogue<float>& epi, int M, int N,
         int Kin, cudaStream_t stream) {
  using Element = typename CutlassElement<T>::type;
  using Device = typename Gemm<T>::Device;
  const RowStride stride_x = cute::make_stride(int64_t(Kin), cute::Int<1>{}, int64_t(M) * Kin);
  const RowStride stride_w = cute::make_stride(int64_t(Kin), cute::Int<1>{}, int64_t(N) * Kin);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.sm_count = multiprocessors();
  typename Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, Kin, 1},
      {reinterpret_cast<const Element*>(x), stride_x, reinterpret_cast<const Element*>(weight), stride_w},
      {epi, out, preact},
      hw_info};
  Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    throw std::invalid_argument(std::string(name) + ": CUTLASS cannot run this problem");
  }
  if (Device::get_workspace_size(args) != 0) throw LaunchError(std::string(name) + ": unexpected workspace");
  const cutlass::Status status = gemm.run(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) throw LaunchError(std::string(name) + ": " + cutlassGetStatusString(status));
}

// The launcher of kernels.h for the GEMM family Gemm: checks what the operand loads need (16-byte
// vectors along K: in_features % 8 == 0 and 16-byte aligned x and W; at least one K step; int32
// shapes), then runs the float16 or bfloat16 instance.
template <template <typename> class Gemm>
void launch(const char* name, void* out, void* preact, const void* x, const void* weight, const void* bias,
            const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin, int64_t rows_per_label,
            int activation, int mode, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (Kin == 0 || Kin % 8 != 0 || !aligned16(x) || !aligned16(weight)) {
    throw std::invalid_argument(std::string(name) + ": needs in_features a positive multiple of 8 and 16-byte "
                                "aligned x and weight");
  }
  if (M > INT32_MAX || N > INT32_MAX || Kin > INT32_MAX) {
    throw std::invalid_argument(std::string(name) + ": a dimension exceeds 2^31 - 1");
  }
  const Epilogue<float> epi{static_cast<const float*>(bias), labels, static_cast<const float*>(delta), N,
                            rows_per_label, activation, mode};
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(Kin);
  if (dtype == kFloat16) {
    run<Gemm>(name, static_cast<__half*>(out), static_cast<__half*>(preact), static_cast<const __half*>(x),
              static_cast<const __half*>(weight), epi, m, n, k, stream);
  } else if (dtype == kBFloat16) {
    run<Gemm>(name, static_cast<__nv_bfloat16*>(out), static_cast<__nv_bfloat16*>(preact),
              static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight), epi, m, n, k, stream);
  } else {
    throw std::invalid_argument(std::string(name) + ": the CUTLASS GEMMs take float16 or bfloat16");
  }
  check_launch(name);
}

}  // namespace cutlass_gemm
}  // namespace lpa
