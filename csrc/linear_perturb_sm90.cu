// linear_perturb forward on Hopper (sm_90a): CUTLASS 3's warp-specialised GEMM (a producer warp loads
// x and W tiles by TMA into a multistage shared-memory pipeline; two consumer warpgroups take turns
// ("ping-pong"), each multiplying its own 128x128 output tile with WGMMA into fp32 registers while the
// other runs its epilogue; persistent CTAs), with our epilogue (linear_cutlass.cuh): from the
// accumulator registers, + bias, the activation, the class-indexed add or scale (delta[y, n],
// y = labels[m / rows_per_label]) and the optional preact store, written straight to global memory.
// Activation and mode are runtime arguments, so there are two instantiations (float16, bfloat16).
//
// Built only when the CUTLASS headers (the pinned nvidia-cutlass wheel) are found and sm_90 is among
// the target archs: _cuda_build.py then compiles this file for sm_90a alone with LPA_WITH_CUTLASS;
// otherwise LPA_CUTLASS_MISSING holds the reason code (CUTLASS_GEMM_REASONS in _cuda_build.py) and
// the launcher refuses.
#include "kernels.h"

#if defined(LPA_WITH_CUTLASS)

#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>

#include "linear_cutlass.cuh"

namespace lpa {
namespace cutlass_gemm {

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

}  // namespace cutlass_gemm

int linear_sm90_missing() { return 0; }

void linear_forward_sm90(void* out, void* preact, const void* x, const void* weight, const void* bias,
                         const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                         int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream) {
  cutlass_gemm::launch<cutlass_gemm::Sm90LinearGemm>("linear_forward_sm90", out, preact, x, weight, bias, labels,
                                                     delta, M, N, Kin, rows_per_label, activation, mode, dtype,
                                                     stream);
}

}  // namespace lpa

#else  // built without CUTLASS: the launcher refuses, and says why through linear_sm90_missing()

#include <stdexcept>

#ifndef LPA_CUTLASS_MISSING
#define LPA_CUTLASS_MISSING 1
#endif

namespace lpa {

int linear_sm90_missing() { return LPA_CUTLASS_MISSING; }

void linear_forward_sm90(void*, void*, const void*, const void*, const void*, const int64_t*, const void*, int64_t,
                         int64_t, int64_t, int64_t, int, int, int, cudaStream_t) {
  throw std::invalid_argument("linear_forward_sm90: the extension was built without the CUTLASS sm_90a GEMM");
}

}  // namespace lpa

#endif
