// linear_perturb forward on Hopper (sm_90a): CUTLASS 3's warp-specialised GEMM (a producer warp loads
// x and W tiles by TMA into a multistage shared-memory pipeline; two consumer warpgroups take turns
// ("ping-pong"), each multiplying its own 128x128 output tile with WGMMA into fp32 registers while the
// other runs its epilogue; persistent CTAs), whose epilogue is ours:
// from the accumulator registers, + bias, the activation, the class-indexed add or scale (delta[y, n],
// y = labels[m / rows_per_label]) and the optional preact store, written straight to global memory.
// Activation and mode are runtime arguments, so there are two instantiations (float16, bfloat16).
//
// Built only when the CUTLASS headers (the pinned nvidia-cutlass wheel) are found and sm_90 is among
// the target archs: _cuda_build.py then compiles this file for sm_90a alone with LPA_WITH_CUTLASS;
// otherwise LPA_SM90_GEMM_MISSING holds the reason code (SM90_GEMM_REASONS in _cuda_build.py) and
// the launcher refuses.
#include "kernels.h"

#if defined(LPA_WITH_CUTLASS)

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>

#include <string>

#include "linear_epilogue.cuh"

namespace lpa {
namespace sm90 {  // named, not anonymous: the kernel's demangled name must parse (lpa_bench.static)

// Row-major (rows, cols, batch) strides: cols contiguous. x is (M, K); W (N, K) is the B operand
// K-major (CUTLASS's "column-major B"), so both operands feed WGMMA without a transpose.
using RowStride = cute::Stride<int64_t, cute::Int<1>, int64_t>;

// The collective epilogue (the interface of cutlass::epilogue::collective::DefaultEpilogue, run by the
// consumer warpgroups after each tile's mainloop): every accumulator element goes through
// Epilogue::apply_in_row at its (m, n), found by partitioning the tile's coordinates like the
// accumulators. Cells outside (M, N) (ragged last tiles; TMA filled their operands with zeros) are
// skipped. No shared memory, so the mainloop keeps all of it for its stages.
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

    // In the WGMMA accumulator layout, accumulators 2j and 2j + 1 are adjacent columns of one row: when
    // both are in range and N is even, preact and out get one 32-bit store each (checked per pair, on
    // coordinates the compiler knows up to the thread's offset).
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

// 128x128x64 tiles, no cluster (no multicast: any M, N), as many pipeline stages as fit in shared
// memory, the ping-pong schedule: the epilogue (gathers, erf/tanh/exp, two outputs) is heavy enough
// that overlapping it with the other warpgroup's mainloop matters more than cooperative's larger tile.
template <typename T>
struct Sm90LinearGemm {
  using Element = typename CutlassElement<T>::type;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using CollectiveEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<LinearPerturbEpilogue<T>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8, Element,
      cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

inline int multiprocessors() {
  int device = 0;
  cudaGetDevice(&device);
  return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
}

template <typename T>
void run(T* out, T* preact, const T* x, const T* weight, const Epilogue<float>& epi, int M, int N, int Kin,
              cudaStream_t stream) {
  using Gemm = Sm90LinearGemm<T>;
  using Element = typename Gemm::Element;
  const RowStride stride_x = cute::make_stride(int64_t(Kin), cute::Int<1>{}, int64_t(M) * Kin);
  const RowStride stride_w = cute::make_stride(int64_t(Kin), cute::Int<1>{}, int64_t(N) * Kin);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.sm_count = multiprocessors();
  typename Gemm::Device::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, Kin, 1},
      {reinterpret_cast<const Element*>(x), stride_x, reinterpret_cast<const Element*>(weight), stride_w},
      {epi, out, preact},
      hw_info};
  typename Gemm::Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    throw std::invalid_argument("linear_forward_sm90: CUTLASS cannot run this problem (in_features % 8 != 0 or "
                                "operands not 16-byte aligned?)");
  }
  if (Gemm::Device::get_workspace_size(args) != 0) throw LaunchError("linear_forward_sm90: unexpected workspace");
  const cutlass::Status status = gemm.run(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) {
    throw LaunchError(std::string("linear_forward_sm90: ") + cutlassGetStatusString(status));
  }
}

}  // namespace sm90

int linear_sm90_missing() { return 0; }

void linear_forward_sm90(void* out, void* preact, const void* x, const void* weight, const void* bias,
                         const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                         int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  if (Kin == 0 || M > INT32_MAX || N > INT32_MAX || Kin > INT32_MAX) {  // the mainloop runs >= 1 K step
    throw std::invalid_argument("linear_forward_sm90: in_features must be in [1, 2^31), M and N below 2^31");
  }
  const Epilogue<float> epi{static_cast<const float*>(bias), labels, static_cast<const float*>(delta), N,
                            rows_per_label, activation, mode};
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(Kin);
  if (dtype == kFloat16) {
    sm90::run(static_cast<__half*>(out), static_cast<__half*>(preact), static_cast<const __half*>(x),
             static_cast<const __half*>(weight), epi, m, n, k, stream);
  } else if (dtype == kBFloat16) {
    sm90::run(static_cast<__nv_bfloat16*>(out), static_cast<__nv_bfloat16*>(preact),
             static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight), epi, m, n, k, stream);
  } else {
    throw std::invalid_argument("linear_forward_sm90: the CUTLASS GEMM takes float16 or bfloat16");
  }
  check_launch("linear_forward_sm90 (cutlass::device_kernel)");
}

}  // namespace lpa

#else  // built without CUTLASS: the launcher refuses, and says why through linear_sm90_missing()

#include <stdexcept>

#ifndef LPA_SM90_GEMM_MISSING
#define LPA_SM90_GEMM_MISSING 1
#endif

namespace lpa {

int linear_sm90_missing() { return LPA_SM90_GEMM_MISSING; }

void linear_forward_sm90(void*, void*, const void*, const void*, const void*, const int64_t*, const void*, int64_t,
                         int64_t, int64_t, int64_t, int, int, int, cudaStream_t) {
  throw std::invalid_argument("linear_forward_sm90: the extension was built without the CUTLASS sm_90a GEMM");
}

}  // namespace lpa

#endif
