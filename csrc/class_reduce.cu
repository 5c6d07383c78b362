// The compiled part of the shared class-reduction layer (class_reduce.cuh): sum_partials, the fixed-order
// second pass that adds the per-split partial class sums of any op's reduction (perturb's backward,
// linear_perturb's backward epilogue) into their output dtype. Called through
// lpa_kernels/_cuda_launch.finish_class_sums, the shared launcher layer on the Python side.
#include "class_reduce.cuh"
#include "kernels.h"

namespace lpa {

void sum_partials(const void* part, int part_dtype, int64_t n_outer, int64_t n_inner, void* out, int out_dtype,
                  cudaStream_t stream) {
  if (n_inner == 0) return;
  constexpr int threads = 256;
  const unsigned grid = grid_for(n_inner, threads);
  LPA_DISPATCH(out_dtype, "sum_partials", {
    if (part_dtype == kFloat64) {
      sum_partials_kernel<scalar_t, double><<<grid, threads, 0, stream>>>(static_cast<const double*>(part), n_outer, n_inner, static_cast<scalar_t*>(out));
    } else {
      sum_partials_kernel<scalar_t, float><<<grid, threads, 0, stream>>>(static_cast<const float*>(part), n_outer, n_inner, static_cast<scalar_t*>(out));
    }
  })
  check_launch("sum_partials_kernel");
}

}  // namespace lpa
