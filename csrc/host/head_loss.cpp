// head_loss: the single-pass LPA step's loss at the classifier in class space (lpa/head_loss.py has the
// algebra). With E = delta W^T (K x K), the perturbed logits are z_b = logits0_b + E[y_b], which equals
// W (h_b + delta[y_b]) + bias, so the (B, D) perturbed activations are never formed: the forward reads and
// writes (B, K), and the backward's class sums S (K x K) of dL/dz give delta's and W's extra gradients as
// two K x K x D products. Sums run in double and are rounded once (the softmax's terms and total per row,
// the loss, E, S and the two products).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "host_kernels.h"

namespace lpa_host {

// exp_nonpositive (host_kernels.h): std::exp is a library call per element, most of a softmax's time at
// K ~ 10; the build's -fno-trapping-math lets the selects below vectorise. x = n ln2 + r with n an integer
// and |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), e^r by its Taylor series to degree 13 (truncation
// below 1e-17 relative), 2^n from the exponent bits; below -708 (e^x within 1.5x of the smallest normal
// double, where 2^n would leave the exponent range) 0.
LPA_HOST_CLONES
void exp_nonpositive(const double* x, double* e, int64_t n) {
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i] < -708.0 ? -708.0 : x[i];
    const double m = xi * 1.4426950408889634 + shifter;
    const double whole = m - shifter;
    const double r = (xi - whole * 6.93147180369123816490e-01) - whole * 1.90821492927058770002e-10;
    double q = 1.0 / 6227020800.0;  // 1 / 13!, then Horner down to 1
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    int64_t bits;
    std::memcpy(&bits, &m, sizeof bits);  // the integer in the low bits: moved into the exponent field
    bits = static_cast<int64_t>(static_cast<uint64_t>(bits + 1023) << 52);
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    e[i] = x[i] < -708.0 ? 0.0 : q * scale;
  }
}

template <typename T>
void softmax_rows(const T* t, int64_t B, int64_t K, T* probs, double* lse, double* terms) {
  std::vector<char> odd(static_cast<size_t>(B), 0);
  std::vector<T> largest(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const T* tb = t + b * K;
    T top = -std::numeric_limits<T>::infinity();
    bool nan = false;
    for (int64_t k = 0; k < K; ++k) {
      nan = nan || std::isnan(tb[k]);
      top = tb[k] > top ? tb[k] : top;
    }
    odd[b] = nan || std::isinf(top);
    largest[b] = top;
    for (int64_t k = 0; k < K; ++k) terms[b * K + k] = odd[b] ? 0.0 : double(tb[k]) - double(top);
  }
  exp_nonpositive(terms, terms, B * K);  // every row at once; t is not read after this (probs may be t)
  for (int64_t b = 0; b < B; ++b) {
    T* p = probs + b * K;
    const double* e = terms + b * K;
    if (odd[b]) {
      std::fill(p, p + K, std::numeric_limits<T>::quiet_NaN());
      if (lse) lse[b] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    double total = 0;
    for (int64_t k = 0; k < K; ++k) total += e[k];
    for (int64_t k = 0; k < K; ++k) p[k] = T(e[k] / total);
    if (lse) lse[b] = double(largest[b]) + std::log(total);
  }
}

template void softmax_rows<float>(const float*, int64_t, int64_t, float*, double*, double*);
template void softmax_rows<double>(const double*, int64_t, int64_t, double*, double*, double*);

template <typename T, typename Label>
LPA_HOST_CLONES
bool head_loss_forward(const T* logits0, const Label* labels, const T* delta, const T* weight, const T* shift, T* z,
                       T* probs, T* loss, T* stats, T* delta_copy, int64_t B, int64_t K, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    if (labels[b] < 0 || labels[b] >= K) return false;
  std::copy(delta, delta + K * D, delta_copy);  // what the backward reads, whatever happens to delta before it
  const std::vector<char> present = present_classes(labels, B, K);
  std::vector<T> E(static_cast<size_t>(K * K));  // rows of the classes present only
  for (int64_t c = 0; c < K; ++c)
    if (present[c])
      for (int64_t k = 0; k < K; ++k) E[c * K + k] = T(dot_double(delta + c * D, weight + k * D, D));
  // the targets t = z + shift (in T, as `logits + shift` in PyTorch), then their softmax and log-sum-exp
  const size_t n = static_cast<size_t>(B * K);
  std::vector<T> t(n);
  std::vector<double> lse(static_cast<size_t>(B)), terms(n);
  for (int64_t b = 0; b < B; ++b) {
    const T* e = E.data() + static_cast<int64_t>(labels[b]) * K;
    T* zb = z + b * K;
    T* tb = t.data() + b * K;
    for (int64_t k = 0; k < K; ++k) {
      zb[k] = logits0[b * K + k] + e[k];
      tb[k] = shift ? T(zb[k] + shift[k]) : zb[k];
    }
  }
  softmax_rows(t.data(), B, K, probs, lse.data(), terms.data());
  double total_loss = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = labels[b];
    const T log_p = T(double(t[b * K + c]) - lse[b]);
    total_loss -= double(log_p);
    if (stats) {  // step_update/naive.class_stats_: the count, p_true (the softmax's, = exp(log_p)) and the CE
      stats[c] += T(1);
      stats[K + c] += probs[b * K + c];
      stats[2 * K + c] += -log_p;
    }
  }
  *loss = T(total_loss / double(B));
  return true;
}

template <typename T, typename Label>
LPA_HOST_CLONES
void head_loss_backward(const T* probs, const Label* labels, const T* delta, const T* weight, T grad_loss,
                        const T* grad_z, T* grad_logits0, T* grad_delta, T* grad_weight, int64_t B, int64_t K,
                        int64_t D, T grad_scale) {
  const double mean_grad = double(grad_loss) / double(B);
  std::vector<double> S(static_cast<size_t>(K * K), 0.0);  // class sums of dL/dz
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = labels[b];
    const T* p = probs + b * K;
    T* g = grad_logits0 + b * K;
    double* s = S.data() + c * K;
    for (int64_t k = 0; k < K; ++k) {
      // d mean CE / d t_k = (softmax_k - [k == y]) / B, rounded once; the logits' own gradient added in T
      T gk = T(mean_grad * (double(p[k]) - (k == c ? 1.0 : 0.0)));
      if (grad_z) gk += grad_z[b * K + k];
      g[k] = gk;
      s[k] += double(gk);
    }
  }
  const std::vector<char> present = present_classes(labels, B, K);
  std::vector<double> row(static_cast<size_t>(D));
  if (grad_delta) {  // grad_delta[c] = grad_scale * sum_k S[c, k] W[k]: zero for the classes absent
    for (int64_t c = 0; c < K; ++c) {
      std::fill(row.begin(), row.end(), 0.0);
      if (present[c])
        for (int64_t k = 0; k < K; ++k) axpy(row.data(), S[c * K + k], weight + k * D, D);
      for (int64_t j = 0; j < D; ++j) grad_delta[c * D + j] = T(row[j]) * grad_scale;  // as perturb_class_grad
    }
  }
  if (grad_weight) {  // grad_weight[k] = sum_c S[c, k] delta[c]: E's part of W's gradient
    for (int64_t k = 0; k < K; ++k) {
      std::fill(row.begin(), row.end(), 0.0);
      for (int64_t c = 0; c < K; ++c)
        if (present[c]) axpy(row.data(), S[c * K + k], delta + c * D, D);
      for (int64_t j = 0; j < D; ++j) grad_weight[k * D + j] = T(row[j]);
    }
  }
}

#define LPA_HOST_HEAD_LOSS(T, Label)                                                                              \
  template bool head_loss_forward<T, Label>(const T*, const Label*, const T*, const T*, const T*, T*, T*, T*, T*, \
                                            T*, int64_t, int64_t, int64_t);                                      \
  template void head_loss_backward<T, Label>(const T*, const Label*, const T*, const T*, T, const T*, T*, T*, T*, \
                                             int64_t, int64_t, int64_t, T);
LPA_HOST_HEAD_LOSS(float, int32_t)
LPA_HOST_HEAD_LOSS(float, int64_t)
LPA_HOST_HEAD_LOSS(double, int32_t)
LPA_HOST_HEAD_LOSS(double, int64_t)
#undef LPA_HOST_HEAD_LOSS

}  // namespace lpa_host
