// pgd_step: the projected update of pgd/naive.py, one class row at a time.
#include <cmath>
#include <limits>
#include <vector>

#include "host_kernels.h"

namespace lpa_host {
namespace {

// torch.sign with NaN kept (naive.py's sign of the gradient).
template <typename T> T sign_keep_nan(T x) { return std::isnan(x) ? x : T((x > 0) - (x < 0)); }

// A row buffer reused across calls (one per thread and dtype): no allocation per class.
template <typename T> std::vector<T>& scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer;
}

// The largest |g_i| of a row and whether every entry is finite, in one pass over eight lanes (vectorised: a
// single running maximum is one dependent select per element). A NaN entry leaves the maximum alone;
// poison sums g_i * 0, which is NaN exactly when some g_i is NaN or infinite.
template <typename T> T largest_magnitude(const T* g, int64_t n, bool& finite) {
  T top[8] = {}, poison[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) top[j] = std::fabs(g[i + j]) > top[j] ? std::fabs(g[i + j]) : top[j];
    for (int j = 0; j < 8; ++j) poison[j] += g[i + j] * T(0);
  }
  T largest = 0, tail = 0;
  for (; i < n; ++i) {
    const T a = std::fabs(g[i]);
    largest = a > largest ? a : largest;
    tail += g[i] * T(0);
  }
  for (int j = 0; j < 8; ++j) {
    largest = top[j] > largest ? top[j] : largest;
    tail += poison[j];
  }
  finite = tail == tail;
  return largest;
}

// One class: delta_c (N) from grad_c (N), whose largest |entry| and finiteness largest_magnitude gave; sd =
// step_c * direction_c.
template <typename T>
void update_row(T* d, const T* g, int64_t N, T sd, T eps, bool l2, T margin, T largest, bool finite) {
  if (finite && largest == 0) return;  // an all-zero gradient (absent class) keeps delta, projection included
  if (!l2) {
    for (int64_t i = 0; i < N; ++i) {  // branch-free, so that it vectorises: a comparison with NaN is false
      const T sign = g[i] != g[i] ? g[i] : T(g[i] > 0) - T(g[i] < 0);  // sign_keep_nan
      const T stepped = d[i] + sd * sign;
      const T low = eps < stepped ? eps : stepped;  // min(stepped, eps), a NaN step kept
      d[i] = -eps > low ? -eps : low;
    }
    return;
  }
  bool has_nan = false;
  for (int64_t i = 0; i < N && !finite && !has_nan; ++i) has_nan = std::isnan(g[i]);
  if (has_nan) {  // the unit vector is NaN everywhere (naive.l2_unit: the row's largest entry is NaN)
    for (int64_t i = 0; i < N; ++i) d[i] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  // l2_unit: g scaled by its largest |entry|, or the sign pattern of the Inf entries when there are any
  // (then the 1e-12 of the definition is 0). In a buffer, so that each loop below is vectorised.
  const bool infinite = std::isinf(largest);
  std::vector<T>& unit = scratch<T>(N);
  if (infinite)
    for (int64_t i = 0; i < N; ++i) unit[i] = std::isinf(g[i]) ? sign_keep_nan(g[i]) : T(0);
  else
    for (int64_t i = 0; i < N; ++i) unit[i] = g[i] / largest;
  // The two norms sum in double (dot_double): a float32 running sum over a long row lost ~10x PyTorch's
  // (pairwise) accuracy and left rows above eps by more than the margin; double also cannot overflow on a
  // float32 delta (a row of 3e19 entries has a finite norm).
  const T denom = T(std::sqrt(dot_double(unit.data(), unit.data(), N))) + (infinite ? T(0) : T(1e-12) / largest);
  for (int64_t i = 0; i < N; ++i) d[i] += sd * (unit[i] / denom);
  const double length = std::sqrt(dot_double(d, d, N)), radius = double(eps - eps * margin);
  if (length > radius) {
    const T shrink = T(radius / length);
    for (int64_t i = 0; i < N; ++i) d[i] *= shrink;
  }
}

}  // namespace

template <typename T>
LPA_HOST_CLONES
void pgd_step(T* delta, const T* grad, const T* step, const T* eps, const T* direction, int64_t K, int64_t N,
              bool l2, T margin, const bool* ok, int64_t* skipped) {
  if (ok != nullptr && !*ok) return;  // the batch's labels were out of range: every class keeps its delta
  for (int64_t c = 0; c < K; ++c) {
    const T* g = grad + c * N;
    bool finite;
    const T largest = largest_magnitude(g, N, finite);
    if (ok != nullptr && !finite) {
      ++*skipped;
      continue;
    }
    update_row(delta + c * N, g, N, step[c] * direction[c], eps[c], l2, margin, largest, finite);
  }
}

template <typename T>
LPA_HOST_CLONES
double dot_double(const T* a, const T* b, int64_t n) {
  double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += double(a[i + j]) * double(b[i + j]);
  double total = 0;
  for (; i < n; ++i) total += double(a[i]) * double(b[i]);
  for (int j = 0; j < 8; ++j) total += partial[j];
  return total;
}

template double dot_double<float>(const float*, const float*, int64_t);
template double dot_double<double>(const double*, const double*, int64_t);
template void pgd_step<float>(float*, const float*, const float*, const float*, const float*, int64_t, int64_t, bool,
                              float, const bool*, int64_t*);
template void pgd_step<double>(double*, const double*, const double*, const double*, const double*, int64_t, int64_t,
                               bool, double, const bool*, int64_t*);

}  // namespace lpa_host
