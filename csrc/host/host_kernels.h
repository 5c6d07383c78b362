// The host (CPU) kernels of the reference backend, on raw pointers (see csrc/README.md, "Host kernels").
// Single-threaded; float and double only, every buffer in one dtype T that is also the accumulation
// dtype (float32 data accumulates in float32, float64 in double), so they follow the reference's
// arithmetic up to summation order. Tensors are contiguous and row-major; labels are in [0, K).
#pragma once

#include <cstdint>

namespace lpa_host {

// pgd/naive.pgd_step_ on delta (K, N) in place from grad (K, N); step, eps, direction (K,). l2 projects
// onto eps - eps * margin (_common.l2_radius_margin). With ok (0-d bool) and skipped (0-d int64) not
// null: naive.guarded_pgd_step_ (nothing changes when !*ok; a class with a non-finite gradient keeps
// its delta and is counted into *skipped).
template <typename T>
void pgd_step(T* delta, const T* grad, const T* step, const T* eps, const T* direction, int64_t K, int64_t N,
              bool l2, T margin, const bool* ok, int64_t* skipped);

// head_pgd/naive.head_pgd_ on delta (K, D) in place: `steps` PGD steps of the summed cross-entropy of
// perturb(h, y, delta) @ W.T + b. h (B, D), labels (B,), weight (K, D), bias (K,) or null; step, eps (K,);
// direction (K,), or null for LPL's confidence rule from the first step's softmax. class_space: the
// add-mode algebra of head_pgd/loop.py (logits h W^T + b once, then K x K per step); else per sample.
// skipped non-null: the training step's guard on the result (head_pgd/op.run_head_pgd_): a class whose new
// row is not finite, or every class when ok is non-null and !*ok, gets its previous row back, and the
// non-finite rows of an ok call are added to *skipped.
template <typename T, typename Label>
void head_pgd(const T* h, const Label* labels, const T* weight, const T* bias, T* delta, int64_t B, int64_t D,
              int64_t K, int64_t steps, const T* step, const T* eps, const T* direction, bool l2, bool scale,
              bool class_space, T margin, const bool* ok, int64_t* skipped);

}  // namespace lpa_host
