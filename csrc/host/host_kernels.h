// The host (CPU) kernels of the reference backend, on raw pointers (see csrc/README.md, "Host kernels").
// Single-threaded; float and double only, every buffer in one dtype T that is also the accumulation
// dtype (float32 data accumulates in float32, float64 in double), so they follow the reference's
// arithmetic up to summation order. Tensors are contiguous and row-major; labels are in [0, K).
#pragma once

#include <cstdint>
#include <vector>

// The memory-bound loops are compiled for AVX2 as well, chosen when the module loads (GCC's target_clones): the
// extension itself stays built for baseline x86-64, with no -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LPA_HOST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LPA_HOST_CLONES
#endif

namespace lpa_host {

// The classes present in labels (B,): 1 where some label equals the class.
template <typename Label> inline std::vector<char> present_classes(const Label* labels, int64_t B, int64_t K) {
  std::vector<char> present(static_cast<size_t>(K), 0);
  for (int64_t b = 0; b < B; ++b) present[static_cast<size_t>(labels[b])] = 1;
  return present;
}

// The dot product of two length-n rows, summed in double in eight interleaved partial sums (a single running
// sum is one dependent add per element: it would not vectorise). pgd_step.cpp.
template <typename T> double dot_double(const T* a, const T* b, int64_t n);

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

// step_update/naive.class_stats_: stats (3, K) set to (accumulate false) or increased by the class statistics
// (counts, sums of exp(log_p_true), sums of -log_p_true) of log_probs (B, K) at labels (B,), rows of zeros
// when ok is non-null and !*ok. Returns false, writing nothing, when a label is outside [0, K).
template <typename T, typename Label>
bool class_stats(T* stats, const T* log_probs, const Label* labels, int64_t B, int64_t K, const bool* ok,
                 bool accumulate);

// policy's direction and radius kinds (step_update/naive.py's DIRECTIONS and RADII codes) and its scalar
// parameters (naive.PARAMS).
constexpr int kFixed = 0, kConfidence = 1, kLossTrend = 2, kConfidenceLinear = 2;
struct PolicyParams {
  double eps, delta_eps, min_radius, momentum;
};

// step_update/naive.policy_ on stats (3, K): with observe, the loss-trend state loss_ema, fall_ema (K)
// float64 and skipped (0-d) updated first; then direction (K) (not written for kFixed: the caller's fixed
// tensor) and radii (K) (likewise); with clear, stats zeroed at the end. loss_ema and fall_ema are read
// for kLossTrend, skipped only with observe.
template <typename T>
void policy(T* stats, int64_t K, double* loss_ema, double* fall_ema, int64_t* skipped, const PolicyParams& params,
            int direction_kind, int radius_kind, bool observe, bool clear, T* direction, T* radii);

}  // namespace lpa_host

namespace lpa_host {

// perturb/naive.perturb on the kernels' layout (_common.delta_layout): h, out (B, F), delta (K, D), feature f
// of sample b reading delta[labels[b], (f / inner) % D] (F a multiple of D * inner); out = h + that value, or
// h * (1 + that value) when scale. grad_h of scale mode is this forward on grad_out.
template <typename T, typename Label>
void perturb_forward(const T* h, const Label* labels, const T* delta, T* out, int64_t B, int64_t F, int64_t D,
                     int64_t inner, bool scale);

// perturb/naive.class_grad on the same layout: grad_delta (K, D) = grad_scale * sum over the samples of class c,
// in sample order, of grad_out_b (times h_b when scale; h may be null otherwise) summed over the features that
// read each entry; zero for absent classes. grad_scale: the single-pass site's batch size (else 1).
template <typename T, typename Label>
void perturb_class_grad(const T* grad_out, const T* h, const Label* labels, T* grad_delta, int64_t B, int64_t F,
                        int64_t K, int64_t D, int64_t inner, bool scale, T grad_scale);

}  // namespace lpa_host

namespace lpa_host {

// The smallest and largest label of labels (B >= 1): _checks.check_labels' range check of CPU labels.
template <typename Label> void label_range(const Label* labels, int64_t B, int64_t* lo, int64_t* hi);

}  // namespace lpa_host

namespace lpa_host {

// e (n) = exp(x) for x (n) <= 0 or NaN (a softmax's terms z - max z), vectorised, within 4e-16 relative of
// std::exp; 0 below -708, NaN for NaN (head_loss.cpp; e may be x).
void exp_nonpositive(const double* x, double* e, int64_t n);

// probs (B, K) = the softmax of each row of t (B, K) (probs may be t): the terms exp(t - max t) in one
// exp_nonpositive pass, summed in double; lse (B) or null: each row's log-sum-exp. A row holding a NaN, or
// whose largest entry is infinite (+inf, or every entry -inf), is all NaN, lse too, as torch.softmax and
// log_softmax make it. terms: B * K doubles of scratch.
template <typename T> void softmax_rows(const T* t, int64_t B, int64_t K, T* probs, double* lse, double* terms);

// y (n, double) += a x. The host kernels' sums over classes and samples (a softmax's total, the sample and
// class gradients, the class sums of P - Y) run in double: one running float32 sum over K = 131,072 classes
// lost ~100x PyTorch's (pairwise) accuracy. Double also keeps the result independent of the order the
// terms come in, to the last float32 bit in practice.
template <typename T> inline void axpy(double* y, double a, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// lpa/head_loss.py's single-pass loss at the classifier in class space. Forward: z (B, K) = logits0 + E[labels]
// with E = delta W^T (delta, weight (K, D)); probs (B, K) = the softmax of z + shift (shift (K,) or null);
// *loss = the mean over the batch of its cross-entropy; stats (3, K) or null increased by the class statistics
// of its log-softmax (as class_stats); delta_copy (K, D) = delta, for the backward. Returns false, writing
// nothing, when a label is outside [0, K). Backward from probs and that copy (as delta): g = grad_loss *
// d loss / d z (+ grad_z when not null) into grad_logits0 (B, K); with S (K, K) its class sums,
// grad_delta = grad_scale * S W and grad_weight = S^T delta (each skipped when null).
template <typename T, typename Label>
bool head_loss_forward(const T* logits0, const Label* labels, const T* delta, const T* weight, const T* shift, T* z,
                       T* probs, T* loss, T* stats, T* delta_copy, int64_t B, int64_t K, int64_t D);
template <typename T, typename Label>
void head_loss_backward(const T* probs, const Label* labels, const T* delta, const T* weight, T grad_loss,
                        const T* grad_z, T* grad_logits0, T* grad_delta, T* grad_weight, int64_t B, int64_t K,
                        int64_t D, T grad_scale);

}  // namespace lpa_host
