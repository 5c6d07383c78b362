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

// One class: delta_c (N) from grad_c (N); sd = step_c * direction_c.
template <typename T> void update_row(T* d, const T* g, int64_t N, T sd, T eps, bool l2, T margin) {
  bool active = false;  // NaN != 0: a NaN gradient is active and propagates
  for (int64_t i = 0; i < N && !active; ++i) active = g[i] != 0;
  if (!active) return;  // an all-zero gradient (absent class) keeps delta, projection included
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
  T largest = 0;
  for (int64_t i = 0; i < N; ++i) {
    const T a = g[i];
    if (std::isnan(a)) has_nan = true;
    else if (std::fabs(a) > largest) largest = std::fabs(a);
  }
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
  // The two norms sum in double: a float32 running sum over a long row lost ~10x PyTorch's (pairwise)
  // accuracy and left rows above eps by more than the margin; double also cannot overflow on a float32
  // delta (a row of 3e19 entries has a finite norm) and costs nothing next to the row's memory traffic.
  double squares = 0;
  for (int64_t i = 0; i < N; ++i) squares += double(unit[i]) * unit[i];
  const T denom = T(std::sqrt(squares)) + (infinite ? T(0) : T(1e-12) / largest);
  double length2 = 0;
  for (int64_t i = 0; i < N; ++i) {
    d[i] += sd * (unit[i] / denom);
    length2 += double(d[i]) * d[i];
  }
  const double length = std::sqrt(length2), radius = double(eps - eps * margin);
  if (length > radius) {
    const T shrink = T(radius / length);
    for (int64_t i = 0; i < N; ++i) d[i] *= shrink;
  }
}

template <typename T> bool all_finite(const T* g, int64_t N) {
  int bad = 0;  // no early exit: the branch-free loop vectorises (NaN fails the comparison)
  for (int64_t i = 0; i < N; ++i) bad |= !(std::fabs(g[i]) <= std::numeric_limits<T>::max());
  return !bad;
}

}  // namespace

template <typename T>
void pgd_step(T* delta, const T* grad, const T* step, const T* eps, const T* direction, int64_t K, int64_t N,
              bool l2, T margin, const bool* ok, int64_t* skipped) {
  if (ok != nullptr && !*ok) return;  // the batch's labels were out of range: every class keeps its delta
  for (int64_t c = 0; c < K; ++c) {
    const T* g = grad + c * N;
    if (ok != nullptr && !all_finite(g, N)) {
      ++*skipped;
      continue;
    }
    update_row(delta + c * N, g, N, step[c] * direction[c], eps[c], l2, margin);
  }
}

template void pgd_step<float>(float*, const float*, const float*, const float*, const float*, int64_t, int64_t, bool,
                              float, const bool*, int64_t*);
template void pgd_step<double>(double*, const double*, const double*, const double*, const double*, int64_t, int64_t,
                               bool, double, const bool*, int64_t*);

}  // namespace lpa_host
