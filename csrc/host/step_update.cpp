// class_stats and policy: step_update/naive.py's class statistics and built-in policies, one pass over
// the classes each (K is small; on the CPU the cost of the PyTorch ops was their dispatch, not the math).
// Every operation follows naive.py's PyTorch ops in the same dtype: PyTorch computes a float32 tensor op
// with a Python-float operand in float32, so the policy's float parameters are rounded to T first.
#include <algorithm>
#include <cmath>
#include <vector>

#include "host_kernels.h"

namespace lpa_host {
namespace {

template <typename T> T torch_sign(T x) { return T((x > 0) - (x < 0)); }  // torch.sign: NaN -> 0

// torch.clamp_min and torch.amax: a NaN operand gives NaN.
template <typename T> T clamp_min(T x, T low) { return std::isnan(x) ? x : std::max(x, low); }
template <typename T> T nan_max(T a, T b) { return std::isnan(a) || std::isnan(b) ? a + b : std::max(a, b); }

// naive._scaled's divisor: size / largest when largest > 0 (NaN is not), else 0.
template <typename T> T scaled(T size, T largest) { return largest > 0 ? size / largest : T(0); }

// The rows of stats (3, K): sample counts, sums of p_true, sums of the cross-entropy.
template <typename T> struct ClassStats {
  const T* counts;
  const T* p_sum;
  const T* ce_sum;
  // naive.class_means: a class whose sums are not finite counts as absent.
  bool finite(int64_t c) const { return std::isfinite(p_sum[c]) && std::isfinite(ce_sum[c]); }
  bool present(int64_t c) const { return counts[c] > 0 && finite(c); }
  T samples(int64_t c) const { return clamp_min(counts[c], T(1)); }
};

// naive.observe_trend_: loss_ema, fall_ema (K) float64 in place, the rejected classes counted in *skipped.
template <typename T>
void observe_trend(const ClassStats<T>& s, int64_t K, double* loss_ema, double* fall_ema, int64_t* skipped,
                   double momentum) {
  for (int64_t c = 0; c < K; ++c) {
    if (s.counts[c] > 0 && !s.finite(c)) ++*skipped;
    if (!s.present(c)) continue;
    const double loss = double(s.ce_sum[c] / s.samples(c));  // the mean in T, as class_means, then widened
    if (std::isnan(loss_ema[c])) {  // first observation of the class
      loss_ema[c] = loss;
      continue;
    }
    const double updated = momentum * loss_ema[c] + (1 - momentum) * loss;
    fall_ema[c] = momentum * fall_ema[c] + (1 - momentum) * (loss_ema[c] - updated);
    loss_ema[c] = updated;
  }
}

// The confidence gaps thr - p_c (0 for an absent class), thr the mean of p_c over the classes present.
template <typename T> void confidence_gaps(const ClassStats<T>& s, int64_t K, T* gap) {
  T total = 0;
  int64_t present = 0;
  for (int64_t c = 0; c < K; ++c) {
    gap[c] = s.present(c) ? s.p_sum[c] / s.samples(c) : T(0);
    total += gap[c];
    present += s.present(c);
  }
  const T thr = total / T(std::max<int64_t>(present, 1));
  for (int64_t c = 0; c < K; ++c) gap[c] = s.present(c) ? thr - gap[c] : T(0);
}

// naive.trend_direction: sign(mean fall over the classes seen - fall_c) for a seen class, else 0.
template <typename T> void trend_direction(const double* loss_ema, const double* fall_ema, int64_t K, T* direction) {
  double total = 0;
  int64_t seen = 0;
  for (int64_t c = 0; c < K; ++c) {
    total += fall_ema[c];
    seen += !std::isnan(loss_ema[c]);
  }
  const double mean = total / double(seen);
  for (int64_t c = 0; c < K; ++c) direction[c] = std::isnan(loss_ema[c]) ? T(0) : T(torch_sign(mean - fall_ema[c]));
}

// The "confidence" radius: eps (1 + delta_eps bonus), bonus the gap scaled by the largest on its side of thr.
template <typename T> void confidence_radius(const T* gap, int64_t K, T eps, T delta_eps, T min_radius, T* radii) {
  T above = 0, below = 0;  // the entries are >= 0 (or NaN), and an empty amax is 0 in naive._scaled
  for (int64_t c = 0; c < K; ++c) {
    above = nan_max(above, clamp_min(gap[c], T(0)));
    below = nan_max(below, clamp_min(-gap[c], T(0)));
  }
  for (int64_t c = 0; c < K; ++c) {
    const T bonus = scaled(clamp_min(gap[c], T(0)), above) + scaled(clamp_min(-gap[c], T(0)), below);
    radii[c] = clamp_min(eps * (T(1) + delta_eps * bonus), min_radius);
  }
}

// The "confidence_linear" radius: eps |gap| / max |gap|.
template <typename T> void linear_radius(const T* gap, int64_t K, T eps, T min_radius, T* radii) {
  T largest = 0;  // as above
  for (int64_t c = 0; c < K; ++c) largest = nan_max(largest, std::fabs(gap[c]));
  for (int64_t c = 0; c < K; ++c) radii[c] = clamp_min(eps * scaled(std::fabs(gap[c]), largest), min_radius);
}

}  // namespace

template <typename T, typename Label>
bool class_stats(T* stats, const T* log_probs, const Label* labels, int64_t B, int64_t K, const bool* ok,
                 bool accumulate) {
  for (int64_t b = 0; b < B; ++b)
    if (labels[b] < 0 || labels[b] >= K) return false;
  if (!accumulate) std::fill(stats, stats + 3 * K, T(0));
  const bool take = ok == nullptr || *ok;  // a rejected batch adds rows of zeros (torch.where(ok, rows, 0))
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = labels[b];
    const T log_p = log_probs[b * K + c];
    stats[c] += take ? T(1) : T(0);
    stats[K + c] += take ? std::exp(log_p) : T(0);
    stats[2 * K + c] += take ? -log_p : T(0);
  }
  return true;
}

template <typename T>
void policy(T* stats, int64_t K, double* loss_ema, double* fall_ema, int64_t* skipped, const PolicyParams& params,
            int direction_kind, int radius_kind, bool observe, bool clear, T* direction, T* radii) {
  const ClassStats<T> s{stats, stats + K, stats + 2 * K};
  if (observe) observe_trend(s, K, loss_ema, fall_ema, skipped, params.momentum);
  std::vector<T> gap;
  if (direction_kind == kConfidence || radius_kind != kFixed) {
    gap.resize(K);
    confidence_gaps(s, K, gap.data());
  }
  if (direction_kind == kConfidence)
    for (int64_t c = 0; c < K; ++c) direction[c] = torch_sign(gap[c]);
  else if (direction_kind == kLossTrend)
    trend_direction(loss_ema, fall_ema, K, direction);
  if (radius_kind == kConfidence)
    confidence_radius(gap.data(), K, T(params.eps), T(params.delta_eps), T(params.min_radius), radii);
  else if (radius_kind == kConfidenceLinear)
    linear_radius(gap.data(), K, T(params.eps), T(params.min_radius), radii);
  if (clear) std::fill(stats, stats + 3 * K, T(0));
}

#define LPA_CLASS_STATS(T, Label) \
  template bool class_stats<T, Label>(T*, const T*, const Label*, int64_t, int64_t, const bool*, bool);
LPA_CLASS_STATS(float, int32_t)
LPA_CLASS_STATS(float, int64_t)
LPA_CLASS_STATS(double, int32_t)
LPA_CLASS_STATS(double, int64_t)
#undef LPA_CLASS_STATS
template void policy<float>(float*, int64_t, double*, double*, int64_t*, const PolicyParams&, int, int, bool, bool,
                            float*, float*);
template void policy<double>(double*, int64_t, double*, double*, int64_t*, const PolicyParams&, int, int, bool, bool,
                             double*, double*);

}  // namespace lpa_host
