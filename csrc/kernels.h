// Host launchers of the lpa_kernels CUDA kernels (defined in the .cu files, bound in bindings.cpp).
//
// Every tensor is a raw device pointer to a contiguous buffer; `dtype` codes are lpa::DType values
// (0 float32, 1 float16, 2 bfloat16, 3 float64). "acc" buffers (partials, workspaces, per-class
// step/eps/direction, linear bias and delta) hold the accumulation type: float64 when the data is
// float64, else float32. Labels, sample orders and class offsets are int64. Each launcher throws
// lpa::LaunchError naming the kernel when the launch fails.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

namespace lpa {

// A failed launch: the bindings raise it as RuntimeError("<kernel>: <CUDA error string>"). Bad
// arguments throw std::invalid_argument (ValueError in Python).
struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// out[b, f] = h[b, f] + delta[y_b, (f / inner) % D]   (mode 0, add)
//           = h[b, f] * (1 + delta[y_b, ...])           (mode 1, scale)
// delta has dtype `delta_dtype`: the data's dtype or its acc type.
void perturb_forward(void* out, const void* h, const int64_t* labels, const void* delta, int64_t B, int64_t F,
                     int64_t D, int64_t inner, int mode, int dtype, int delta_dtype, cudaStream_t stream);

// grad_h (optional) and the per-class partial sums part[(split, c, k)] (acc type) in one pass over
// grad_out. `order`/`offsets` (K + 1) sort the samples by class; `splits` samples shares per class.
// h is read in scale mode (grad_delta = sum grad_out * h); delta only when grad_h is wanted in scale mode.
void perturb_backward(void* grad_h, const void* grad_out, const void* h, const int64_t* order,
                      const int64_t* offsets, const void* delta, int64_t K, int64_t F, int64_t D, int64_t inner,
                      int mode, int dtype, int delta_dtype, int64_t splits, void* part, cudaStream_t stream);

// out[j] = sum_i part[i * n_inner + j] (part in acc type of part_dtype), rounded to out_dtype.
void sum_partials(const void* part, int part_dtype, int64_t n_outer, int64_t n_inner, void* out, int out_dtype,
                  cudaStream_t stream);

// pgd_step on delta (K, D) in place from grad (K, D) of dtype delta's or its acc type (or 16-bit for a
// float32 delta with tile == 0). With `ok` (a bool on the device; null for the plain step) the training
// step's guard: non-finite classes, or all when *ok is false, keep their delta; the former (when *ok) are
// added to the int64 *skipped. tile == 0: one block per class; tile > 0: blocks over (tile-entry feature
// tiles, class), with `stats` (6 x K x ceil(D / tile) acc) for l2 or the guard (unused, may be null, for
// unguarded linf). `rounded` (K, D) in grad's dtype, or null; tile == 0 only: the new delta also into it.
void pgd_step(void* delta, const void* grad, const void* step, const void* eps, const void* direction, int64_t K,
              int64_t D, int norm, int dtype, int grad_dtype, const bool* ok, int64_t* skipped, int64_t tile,
              void* stats, void* rounded, cudaStream_t stream);

// The class reduction of grad_out (and h for scale) over (group tile, class, sample split) blocks and
// pgd_step, one launch. `workspace` ((splits + 1) x K x D + 6 x K x max_tiles acc) holds the per-split
// partial sums, the class gradient and the per-tile partials of the update; `arrivals` (K x (1 +
// max_tiles) int32, zero) counts the tiles done per class and the splits done per (class, tile).
// max_tiles bounds the group tiles (reduce_block); more throws.
void class_grad_pgd_step(void* delta, const void* grad_out, const void* h, const int64_t* order,
                         const int64_t* offsets, const void* step, const void* eps, const void* direction, int64_t K,
                         int64_t F, int64_t D, int64_t inner, int mode, int norm, int dtype, int delta_dtype,
                         int64_t splits, int64_t max_tiles, void* workspace, int* arrivals, cudaStream_t stream);

// Row by row, out[b] = softmax(logits[b]) - onehot(y_b) for (B, K) logits of dtype `dtype` (out may alias
// logits); p_true[b] (acc type, may be null) = the true class's probability.
void softmax_xent_grad(void* out, void* p_true, const void* logits, const int64_t* labels, int64_t B, int64_t K,
                       int dtype, cudaStream_t stream);

// Per class c, sums[c] = sum over its samples b of softmax(logits[b] + shift[c]) - onehot(c), for (B, K)
// logits and (K, K) shift and sums of dtype `dtype`; class c's samples are order[starts[c]:starts[c + 1]]
// (int64); scratch (2, B) acc type; p_true[b] (acc type, may be null) = the true class's probability.
void softmax_class_sum(void* sums, void* p_true, void* scratch, const void* logits, const void* shift,
                       const int64_t* order, const int64_t* starts, int64_t B, int64_t K, int dtype,
                       cudaStream_t stream);

// All `steps` class-space head_pgd_ steps in one launch (head_pgd_fused.cu; lpa_kernels/head_pgd/triton_fused.py
// is its twin): current (K, D) float32 in place, base = h @ W.T + b (B, K) and weight (K, D) of the GEMM dtype
// `dtype` (float32, float16 or bfloat16), class c's samples order[starts[c]:starts[c + 1]] (int64), step,
// eps, direction (K,) float32; scratch: shift (K, K) float32, sums (K, K) of `dtype`, grad (K, D) float32,
// softmax (2, B) float32.
void class_space_steps(float* current, const void* base, const void* weight, const int64_t* order,
                       const int64_t* starts, const float* step, const float* eps, const float* direction, float* shift,
                       void* sums, float* grad, float* softmax, float* previous, const bool* ok, int64_t* skipped,
                       int64_t B, int64_t K, int64_t D, int64_t steps, int norm, int dtype, cudaStream_t stream);

// Tensor-core GEMM x (M, Kin) @ weight (N, Kin)^T with the bias/activation/perturb epilogue
// (float16/bfloat16 only). Row m uses labels[m / rows_per_label]; preact (M, N) may be null.
void linear_forward(void* out, void* preact, const void* x, const void* weight, const void* bias,
                    const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                    int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream);

// linear_forward on CUTLASS 3 GEMMs (same arguments; in_features % 8 == 0 and 16-byte aligned x and
// weight, as their 16-byte operand loads need): the sm_90a TMA + WGMMA warp-specialised kernel
// (linear_perturb_sm90.cu) and the cp.async + mma.sync multistage kernel for sm_80 and sm_90
// (linear_perturb_sm80.cu). Each throws std::invalid_argument when the extension was built without it.
void linear_forward_sm90(void* out, void* preact, const void* x, const void* weight, const void* bias,
                         const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                         int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream);
void linear_forward_sm80(void* out, void* preact, const void* x, const void* weight, const void* bias,
                         const int64_t* labels, const void* delta, int64_t M, int64_t N, int64_t Kin,
                         int64_t rows_per_label, int activation, int mode, int dtype, cudaStream_t stream);

// 0 when that CUTLASS GEMM was built, else why not (CUTLASS_GEMM_REASONS in lpa_kernels/_cuda_build.py).
int linear_sm90_missing();
int linear_sm80_missing();

// The same epilogue applied to a precomputed z = x @ weight^T (M, N) (every dtype).
void linear_epilogue(void* out, void* preact, const void* z, const void* bias, const int64_t* labels,
                     const void* delta, int64_t M, int64_t N, int64_t rows_per_label, int activation, int mode,
                     int dtype, cudaStream_t stream);

// grad_preact (M, N) and the per-class partial sums of grad_delta and grad_bias (acc, (splits, K, N)
// each) in one pass; samples b own rows b * rows_per_label .. + rows_per_label - 1.
void linear_backward_epilogue(void* grad_preact, const void* grad_out, const void* preact, const int64_t* order,
                              const int64_t* offsets, const void* delta, int64_t K, int64_t B,
                              int64_t rows_per_label, int64_t N, int activation, int mode, int dtype,
                              int64_t splits, void* part_delta, void* part_bias, cudaStream_t stream);

// The LPA training step's fused per-step ops (lpa_kernels/step_update/naive.py), one block each but
// class_stats (one per class). checked_label_plan: labels (B, int32 or int64, `label_bytes` wide) ->
// clamped `safe`, `loss_labels` (-100 everywhere for a bad batch), *ok, the (min, max) of a bad batch into
// bad_range, and the label plan (B + K + 1 + 2 * min(B, K) + 1 int64); `cursor` is K int64 of scratch.
void checked_label_plan(const void* labels, int label_bytes, int64_t* safe, int64_t* loss_labels, bool* ok,
                        int64_t* bad_range, int64_t* plan, int64_t* cursor, int64_t B, int64_t K,
                        cudaStream_t stream);
// The same outputs for 1 to 4096 labels by sorting them, in two launches (one block, then a grid over the
// classes); `sorted` is B int64 of scratch (the sorted labels).
void sorted_label_plan(const void* labels, int label_bytes, int64_t* safe, int64_t* loss_labels, bool* ok,
                       int64_t* bad_range, int64_t* plan, int64_t* sorted, int64_t B, int64_t K, cudaStream_t stream);

// stats (3, K) set to (or, with `accumulate`, increased by) the class statistics of log_probs (B, K) at
// the in-range labels, zero when *ok is false; stats and log_probs float32 or float64 (`dtype`).
void class_stats(void* stats, const void* log_probs, const int64_t* labels, const bool* ok, int64_t B, int64_t K,
                 bool accumulate, int dtype, cudaStream_t stream);

// The built-in policies from stats (3, K) (`dtype`, float32 or float64; so are the fixed tensors and the
// outputs): direction 0 fixed / 1 confidence / 2 loss trend, radius 0 fixed / 1 confidence / 2
// confidence_linear; `observe` updates loss_ema, fall_ema (K float64) and *skipped first; `clear` zeroes
// stats. params: float64 (eps, delta_eps, min_radius, momentum).
void policy(void* stats, const void* fixed_direction, const void* fixed_eps, double* loss_ema, double* fall_ema,
            int64_t* skipped, const double* params, void* direction_out, void* eps_out, int64_t K, int direction,
            int radius, bool observe, bool clear, int dtype, cudaStream_t stream);

}  // namespace lpa
