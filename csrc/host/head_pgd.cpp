// head_pgd: all the steps of a head_pgd_ call without autograd, the algebra of head_pgd/loop.py: the
// gradient of the summed cross-entropy with respect to the perturbed activations is (P - Y) W, so the
// class gradient is sum_{y_b = c} (P_b - Y_b) W (times h_b for scale), then pgd_step's update.
#include <algorithm>
#include <cmath>
#include <vector>

#include "host_kernels.h"

namespace lpa_host {
namespace {

// Eight independent partial sums: the compiler vectorises them (a single running sum would have to stay
// in order under -O3 without -ffast-math).
template <typename T> T dot(const T* a, const T* b, int64_t n) {
  T part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

// z (K) <- softmax(z) in place; NaN in z gives a NaN row, as torch.softmax.
template <typename T> void softmax(T* z, int64_t K) {
  T largest = z[0];
  for (int64_t k = 1; k < K; ++k) largest = std::max(largest, z[k]);
  double total = 0;
  for (int64_t k = 0; k < K; ++k) total += z[k] = std::exp(z[k] - largest);
  for (int64_t k = 0; k < K; ++k) z[k] = T(z[k] / total);
}

// confidence.confidence_direction's sign from the true-class probabilities p_true (B,): p_c the mean over
// class c's samples, thr the mean of p_c over the classes present, sign(thr - p_c) (0 when absent or NaN).
// A class whose sum is not finite (a NaN sample) counts as absent.
template <typename T, typename Label>
void confidence_direction(T* direction, const T* p_true, const Label* labels, int64_t B, int64_t K) {
  std::vector<double> sums(K, 0.0), counts(K, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    sums[labels[b]] += p_true[b];
    counts[labels[b]] += 1;
  }
  std::vector<char> present(K);
  double total = 0, n_present = 0;
  for (int64_t c = 0; c < K; ++c) {
    present[c] = counts[c] > 0 && std::isfinite(sums[c]);
    if (present[c]) {
      sums[c] /= counts[c];
      total += sums[c];
      n_present += 1;
    }
  }
  const double thr = total / std::max(n_present, 1.0);
  for (int64_t c = 0; c < K; ++c) {
    const double gap = present[c] ? thr - sums[c] : 0.0;
    direction[c] = T((gap > 0) - (gap < 0));
  }
}

}  // namespace

template <typename T, typename Label>
LPA_HOST_CLONES
void head_pgd_steps(const T* h, const Label* labels, const T* weight, const T* bias, T* delta, int64_t B, int64_t D,
                    int64_t K, int64_t steps, const T* step, const T* eps, const T* direction, bool l2, bool scale,
                    bool class_space, T margin) {
  if (B == 0 || steps == 0) return;
  std::vector<T> grad(K * D), probs(K), p_true(direction == nullptr ? B : 0), confidence(K);
  std::vector<double> class_grad(K * D);  // grad, summed in double (axpy), rounded once per step
  const std::vector<char> present = present_classes(labels, B, K);
  // class space: the logits without delta (B, K), once; per step the offset E = delta W^T (K, K) and the
  // class sums S[c] = sum_{y_b = c} (P_b - Y_b) (K, K). Rows: the perturbed sample and its gradient (D).
  std::vector<T> base, shift, h_tilde, row_probs;
  std::vector<double> sums, sample_grad, terms;
  if (class_space) {
    base.resize(B * K);
    shift.resize(K * K);
    sums.resize(K * K);
    row_probs.resize(B * K);
    terms.resize(B * K);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) base[b * K + k] = dot(h + b * D, weight + k * D, D) + (bias ? bias[k] : T(0));
  } else {
    h_tilde.resize(D);
    sample_grad.resize(D);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const bool first_confidence = direction == nullptr;
    std::fill(class_grad.begin(), class_grad.end(), 0.0);
    if (class_space) {
      for (int64_t c = 0; c < K; ++c)
        if (present[c])
          for (int64_t k = 0; k < K; ++k) shift[c * K + k] = dot(delta + c * D, weight + k * D, D);
      std::fill(sums.begin(), sums.end(), 0.0);
      // every row's logits, then their softmax in place (softmax_rows: one vectorised exp pass)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k)
          row_probs[b * K + k] = base[b * K + k] + shift[static_cast<int64_t>(labels[b]) * K + k];
      softmax_rows(row_probs.data(), B, K, row_probs.data(), nullptr, terms.data());
      for (int64_t b = 0; b < B; ++b) {
        const int64_t c = labels[b];
        T* p = row_probs.data() + b * K;
        if (first_confidence) p_true[b] = p[c];
        p[c] -= 1;
        axpy(&sums[c * K], 1.0, p, K);
      }
      for (int64_t c = 0; c < K; ++c)
        if (present[c])
          for (int64_t k = 0; k < K; ++k) axpy(&class_grad[c * D], sums[c * K + k], weight + k * D, D);
    } else {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t c = labels[b];
        const T* hb = h + b * D;
        const T* dc = delta + c * D;
        for (int64_t i = 0; i < D; ++i) h_tilde[i] = scale ? hb[i] * (1 + dc[i]) : hb[i] + dc[i];
        for (int64_t k = 0; k < K; ++k) probs[k] = dot(h_tilde.data(), weight + k * D, D) + (bias ? bias[k] : T(0));
        softmax(probs.data(), K);
        if (first_confidence) p_true[b] = probs[c];
        probs[c] -= 1;
        std::fill(sample_grad.begin(), sample_grad.end(), 0.0);
        for (int64_t k = 0; k < K; ++k) axpy(sample_grad.data(), probs[k], weight + k * D, D);
        double* gc = &class_grad[c * D];
        for (int64_t i = 0; i < D; ++i) gc[i] += scale ? sample_grad[i] * hb[i] : sample_grad[i];
      }
    }
    for (int64_t i = 0; i < K * D; ++i) grad[i] = T(class_grad[i]);
    if (first_confidence) {  // LPL's rule, fixed from the first step's softmax
      confidence_direction(confidence.data(), p_true.data(), labels, B, K);
      direction = confidence.data();
    }
    pgd_step(delta, grad.data(), step, eps, direction, K, D, l2, margin, nullptr, nullptr);
  }
}

template <typename T, typename Label>
void head_pgd(const T* h, const Label* labels, const T* weight, const T* bias, T* delta, int64_t B, int64_t D,
              int64_t K, int64_t steps, const T* step, const T* eps, const T* direction, bool l2, bool scale,
              bool class_space, T margin, const bool* ok, int64_t* skipped) {
  std::vector<T> previous(skipped ? delta : nullptr, skipped ? delta + K * D : nullptr);
  head_pgd_steps(h, labels, weight, bias, delta, B, D, K, steps, step, eps, direction, l2, scale, class_space, margin);
  if (!skipped) return;
  const bool accepted = ok == nullptr || *ok;
  for (int64_t c = 0; c < K; ++c) {
    T* row = delta + c * D;
    bool finite = true;
    for (int64_t i = 0; i < D; ++i) finite = finite && std::isfinite(row[i]);
    if (!finite && accepted) ++*skipped;
    if (!finite || !accepted) std::copy(previous.begin() + c * D, previous.begin() + (c + 1) * D, row);
  }
}

#define LPA_HEAD_PGD(T, Label)                                                                                   \
  template void head_pgd<T, Label>(const T*, const Label*, const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                   int64_t, const T*, const T*, const T*, bool, bool, bool, T, const bool*,    \
                                   int64_t*);
LPA_HEAD_PGD(float, int32_t)
LPA_HEAD_PGD(float, int64_t)
LPA_HEAD_PGD(double, int32_t)
LPA_HEAD_PGD(double, int64_t)
#undef LPA_HEAD_PGD

}  // namespace lpa_host
