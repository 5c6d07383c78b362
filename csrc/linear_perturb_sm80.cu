// linear_perturb forward on Ampere-class GPUs (sm_80; compiled for sm_90 too, where it is the
// fallback when TMA/WGMMA is not built): CUTLASS 3's multistage GEMM (the "2.x-style" mainloop:
// cp.async 16-byte copies into a 3-stage swizzled shared-memory pipeline, ldmatrix, mma.sync
// 16x8x16 with fp32 accumulators; 4 warps on 128x128x64 tiles, one CTA per tile) with the same
// epilogue as the sm_90a kernel (linear_cutlass.cuh). Activation and mode are runtime arguments:
// two instantiations (float16, bfloat16) per arch.
//
// Built when the CUTLASS headers are found and sm_80 (or another sm_8x, or sm_90) is among the target
// archs; otherwise a stub whose linear_sm80_missing() gives the reason code (CUTLASS_GEMM_REASONS
// in _cuda_build.py).
#include "kernels.h"

#if defined(LPA_WITH_CUTLASS)

#include <cutlass/gemm/collective/collective_mma.hpp>

#include "linear_cutlass.cuh"

namespace lpa {
namespace cutlass_gemm {

template <typename Element> struct Sm80MmaAtom;
template <> struct Sm80MmaAtom<cutlass::half_t> { using type = cute::SM80_16x8x16_F32F16F16F32_TN; };
template <> struct Sm80MmaAtom<cutlass::bfloat16_t> { using type = cute::SM80_16x8x16_F32BF16BF16F32_TN; };

// Both operands are K-major (x rows, W rows), 64 elements (128 bytes) of K per tile row: the shared
// layout atom is 8 rows x 64 with a 128-byte XOR swizzle, so ldmatrix reads are bank-conflict free;
// the global copy is 128 threads x 16 bytes, 16 rows x 64 per pass. 3 stages x 32 KB = 96 KB of
// shared memory (fits sm_86/sm_89's 99 KB too).
template <typename T>
struct Sm80LinearGemm {
  using Element = typename CutlassElement<T>::type;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename Sm80MmaAtom<Element>::type>,
                                  cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>,  // 2 x 2 warps
                                  cute::Tile<cute::_32, cute::_32, cute::_16>>;              // x4 ldmatrix for B too
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using GmemTiledCopy = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
      cute::Layout<cute::Shape<cute::_16, cute::_8>, cute::Stride<cute::_8, cute::_1>>{},
      cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using CollectiveMainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<3>, TileShape, Element, RowStride, Element, RowStride, TiledMma,
      GmemTiledCopy, SmemLayoutAtom, SmemCopyAtom, cute::identity,   // A = x
      GmemTiledCopy, SmemLayoutAtom, SmemCopyAtom, cute::identity>;  // B = W
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      LinearPerturbEpilogue<T>>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

}  // namespace cutlass_gemm

int linear_sm80_missing() { return 0; }

void linear_forward_sm80(void* out, void* preact, const void* x, const void* weight, const void* bias,
                         const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                         int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream) {
  cutlass_gemm::launch<cutlass_gemm::Sm80LinearGemm>("linear_forward_sm80", out, preact, x, weight, bias, labels,
                                                     delta, M, N, Kin, rows_per_label, activation, mode, dtype,
                                                     stream);
}

}  // namespace lpa

#else  // built without CUTLASS: the launcher refuses, and says why through linear_sm80_missing()

#include <stdexcept>

#ifndef LPA_CUTLASS_MISSING
#define LPA_CUTLASS_MISSING 1
#endif

namespace lpa {

int linear_sm80_missing() { return LPA_CUTLASS_MISSING; }

void linear_forward_sm80(void*, void*, const void*, const void*, const void*, const int64_t*, const void*, int64_t,
                         int64_t, int64_t, int64_t, int, int, int, cudaStream_t) {
  throw std::invalid_argument("linear_forward_sm80: the extension was built without the CUTLASS sm_80 GEMM");
}

}  // namespace lpa

#endif
