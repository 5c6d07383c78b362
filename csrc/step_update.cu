// The fused per-step ops of the LPA training step (lpa_kernels/step_update/naive.py defines them), one
// launch each:
// - checked_label_plan: one block. The labels' range (ok, the bad-range record), the clamped and loss
//   labels, then the label plan by a counting sort: class counts (atomic adds of integers: exact in any
//   order), their exclusive scan and the segments by one thread, then the samples placed tile by tile in
//   index order, each at its class's cursor plus its rank among the tile's samples of its class (stable,
//   so the plan is the same on every run). Its class scan runs on one thread: above B x K = 2^21
//   (plan.ONE_LAUNCH_PLAN_MAX, LLM-vocabulary heads) the plan is sorted instead, for batches of up to
//   kSortedPlanMaxB samples, in two launches:
// - sorted_label_plan: one block checks and clamps the labels as above, sorts the distinct keys
//   label * B + sample in shared memory (a bitonic network over the next power of two, padded with
//   INT64_MAX; distinct keys, so their order is the stable class order: order = key % B), marks the first
//   sample of each class (its left neighbour's label differs) and numbers those by a scan of the threads'
//   runs (the segments); class_starts: a grid over the classes finds starts[c], the number of sorted
//   labels below c, by binary search of the sorted labels the first launch left in `sorted`.
// - class_stats: one block per class sums its samples' count, true-class probability and cross-entropy
//   in a fixed tree order (block_reduce), gated by ok, into or onto stats.
// - policy: one block walks the classes three times: the means and the confidence threshold's sums with
//   the loss-trend update; the largest gaps and the trend's mean fall; then direction and radius.
#include "common.cuh"
#include "kernels.h"

namespace lpa {

constexpr int kStepThreads = 256;
constexpr int64_t kIgnoreLabel = -100;  // naive.IGNORE_LABEL, F.cross_entropy's ignore_index

// The block's verdict on the labels: *ok_out (every label in [0, K): true for an empty batch) and, for a bad
// batch, its (min, max) into bad_range; every thread gets it. `scratch`: one int64 per thread.
template <typename L>
__device__ bool label_verdict(const L* labels, bool* ok_out, int64_t* bad_range, int64_t B, int64_t K,
                              int64_t* scratch) {
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int64_t b = threadIdx.x; b < B; b += kStepThreads) {
    const int64_t y = static_cast<int64_t>(labels[b]);
    lo = y < lo ? y : lo;
    hi = y > hi ? y : hi;
  }
  lo = block_reduce(lo, scratch, [](int64_t a, int64_t b) { return a < b ? a : b; });
  hi = block_reduce(hi, scratch, [](int64_t a, int64_t b) { return a > b ? a : b; });
  const bool ok = lo >= 0 && hi < K;
  if (threadIdx.x == 0) {
    *ok_out = ok;
    if (!ok) {
      bad_range[0] = lo;
      bad_range[1] = hi;
    }
  }
  return ok;
}

// Sample b's label clamped into [0, K), stored as safe[b], and its loss label (kIgnoreLabel in a bad batch).
template <typename L>
__device__ int64_t store_checked_label(const L* labels, int64_t b, int64_t K, bool ok, int64_t* safe,
                                       int64_t* loss_labels) {
  int64_t y = static_cast<int64_t>(labels[b]);
  y = y < 0 ? 0 : (y >= K ? K - 1 : y);
  safe[b] = y;
  loss_labels[b] = ok ? y : kIgnoreLabel;
  return y;
}

// The plan's segments past the `segments` classes present (one thread): class K, no samples (start B).
__device__ void pad_segments(int64_t* segment_class, int64_t* segment_start, int64_t segments, int64_t B, int64_t K,
                             int64_t S) {
  for (int64_t s = segments; s <= S; ++s) {
    if (s < S) segment_class[s] = K;
    segment_start[s] = B;
  }
}

template <typename L>
__global__ void __launch_bounds__(kStepThreads)
checked_label_plan_kernel(const L* labels, int64_t* safe, int64_t* loss_labels, bool* ok_out, int64_t* bad_range,
                          int64_t* plan, int64_t* cursor, int64_t B, int64_t K, int64_t S) {
  __shared__ int64_t scratch[kStepThreads];
  __shared__ int64_t tile[kStepThreads];
  const int t = threadIdx.x;
  const bool ok = label_verdict(labels, ok_out, bad_range, B, K, scratch);
  int64_t* order = plan;
  int64_t* starts = plan + B;
  int64_t* segment_class = starts + K + 1;
  int64_t* segment_start = segment_class + S;
  for (int64_t c = t; c <= K; c += kStepThreads) starts[c] = 0;
  __syncthreads();
  for (int64_t b = t; b < B; b += kStepThreads) {
    const int64_t y = store_checked_label(labels, b, K, ok, safe, loss_labels);
    atomicAdd(reinterpret_cast<unsigned long long*>(starts + y), 1ull);
  }
  __syncthreads();
  if (t == 0) {  // counts -> exclusive starts; one segment per class present, then padding
    int64_t placed = 0, segments = 0;
    for (int64_t c = 0; c < K; ++c) {
      const int64_t count = starts[c];
      starts[c] = cursor[c] = placed;
      if (count > 0) {
        segment_class[segments] = c;
        segment_start[segments++] = placed;
      }
      placed += count;
    }
    starts[K] = placed;
    pad_segments(segment_class, segment_start, segments, B, K, S);
  }
  __syncthreads();
  for (int64_t base = 0; base < B; base += kStepThreads) {
    const int64_t b = base + t;
    const int64_t n = min64(B - base, kStepThreads);
    if (b < B) tile[t] = safe[b];
    __syncthreads();
    if (b < B) {
      const int64_t y = tile[t];
      int64_t rank = 0;
      bool last = true;
      for (int64_t j = 0; j < n; ++j) {
        rank += j < t && tile[j] == y;
        last = last && !(j > t && tile[j] == y);
      }
      order[cursor[y] + rank] = b;
      scratch[t] = last ? rank + 1 : 0;
    }
    __syncthreads();
    if (b < B && scratch[t] > 0) cursor[tile[t]] += scratch[t];  // one writer per class: its tile's last sample
    __syncthreads();
  }
}

constexpr int64_t kSortedPlanMaxB = 4096;  // plan.SORTED_PLAN_MAX_B: the keys fill 32 KiB of shared memory

template <typename L>
__global__ void __launch_bounds__(kStepThreads)
sorted_label_plan_kernel(const L* labels, int64_t* safe, int64_t* loss_labels, bool* ok_out, int64_t* bad_range,
                         int64_t* plan, int64_t* sorted, int64_t B, int64_t K, int64_t S, int padded) {
  __shared__ int64_t keys[kSortedPlanMaxB];
  __shared__ int64_t scratch[kStepThreads];
  const int t = threadIdx.x;
  const bool ok = label_verdict(labels, ok_out, bad_range, B, K, scratch);
  for (int64_t b = t; b < padded; b += kStepThreads) {
    int64_t key = INT64_MAX;  // the padding sorts last
    if (b < B) key = store_checked_label(labels, b, K, ok, safe, loss_labels) * B + b;
    keys[b] = key;
  }
  __syncthreads();
  // bitonic network: pair (i, i + stride) ascending within blocks of `size` whose index has bit `size` clear
  for (int size = 2; size <= padded; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int pair = t; pair < padded / 2; pair += kStepThreads) {
        const int i = 2 * pair - (pair & (stride - 1));  // the pair's lower index: stride a power of two
        const int64_t a = keys[i], c = keys[i + stride];
        if ((a > c) == ((i & size) == 0)) {
          keys[i] = c;
          keys[i + stride] = a;
        }
      }
      __syncthreads();
    }
  }
  // plan = [order (B) | starts (K + 1, class_starts_kernel) | segment_class (S) | segment_start (S + 1)]
  int64_t* segment_class = plan + B + K + 1;
  int64_t* segment_start = segment_class + S;
  // each thread numbers the classes that begin in its run of the sorted keys, after those of earlier runs
  const int64_t run = (B + kStepThreads - 1) / kStepThreads;
  const int64_t first = min64(B, t * run), end = min64(B, first + run);
  int64_t begun = 0;
  for (int64_t b = first; b < end; ++b) {
    const int64_t y = keys[b] / B;
    plan[b] = keys[b] - y * B;
    sorted[b] = y;
    begun += b == 0 || keys[b - 1] / B != y;
  }
  scratch[t] = begun;
  __syncthreads();
  if (t == 0) {  // exclusive scan of the runs' counts (one per thread); the padding after their total
    int64_t total = 0;
    for (int i = 0; i < kStepThreads; ++i) {
      const int64_t count = scratch[i];
      scratch[i] = total;
      total += count;
    }
    pad_segments(segment_class, segment_start, total, B, K, S);
  }
  __syncthreads();
  int64_t segment = scratch[t];
  for (int64_t b = first; b < end; ++b) {
    const int64_t y = keys[b] / B;
    if (b == 0 || keys[b - 1] / B != y) {
      segment_class[segment] = y;
      segment_start[segment++] = b;
    }
  }
}

// starts[c] (the plan's, after its B entries of order) for c <= K: the number of sorted labels below c.
__global__ void __launch_bounds__(kStepThreads)
class_starts_kernel(const int64_t* sorted, int64_t* starts, int64_t B, int64_t K) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x;
  if (c > K) return;
  int64_t lo = 0, hi = B;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < c) lo = mid + 1;
    else hi = mid;
  }
  starts[c] = lo;
}

template <typename A>
__global__ void __launch_bounds__(kStepThreads)
class_stats_kernel(A* stats, const A* log_probs, const int64_t* labels, const bool* ok, int64_t B, int64_t K,
                   bool accumulate) {
  __shared__ A scratch[kStepThreads];
  const int64_t c = blockIdx.x;
  A count = 0, p_sum = 0, ce_sum = 0;
  for (int64_t b = threadIdx.x; b < B; b += kStepThreads) {
    if (labels[b] == c) {
      const A log_p = log_probs[b * K + c];
      count += A(1);
      p_sum += exp(log_p);
      ce_sum -= log_p;
    }
  }
  const auto add = [](A a, A b) { return a + b; };
  count = block_reduce(count, scratch, add);
  p_sum = block_reduce(p_sum, scratch, add);
  ce_sum = block_reduce(ce_sum, scratch, add);
  if (threadIdx.x == 0) {
    const bool gate = *ok;
    A values[3] = {gate ? count : A(0), gate ? p_sum : A(0), gate ? ce_sum : A(0)};
    for (int i = 0; i < 3; ++i) stats[i * K + c] = accumulate ? stats[i * K + c] + values[i] : values[i];
  }
}

template <typename A> struct ClassMeans {
  A count;
  bool finite, present;
  A p_true, loss;
};

// naive.class_means for class c: a class whose sums are not finite counts as absent, its means 0.
template <typename A> __device__ ClassMeans<A> class_means(const A* stats, int64_t K, int64_t c) {
  const A count = stats[c], p_sum = stats[K + c], ce_sum = stats[2 * K + c];
  const bool finite = isfinite(p_sum) && isfinite(ce_sum);
  const A samples = count > A(1) ? count : A(1);
  return {count, finite, count > A(0) && finite, finite ? p_sum / samples : A(0), finite ? ce_sum / samples : A(0)};
}

template <typename A> __device__ __forceinline__ A signum(A x) { return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0)); }

template <typename A>
__global__ void __launch_bounds__(kStepThreads)
policy_kernel(A* stats, const A* fixed_direction, const A* fixed_eps, double* loss_ema, double* fall_ema,
              int64_t* skipped, const double* params, A* direction_out, A* eps_out, int64_t K, int direction,
              int radius, bool observe, bool clear) {
  __shared__ A scratch[kStepThreads];
  __shared__ double scratch64[kStepThreads];
  __shared__ int64_t scratch_int[kStepThreads];
  const int t = threadIdx.x;
  const A eps = static_cast<A>(params[0]), delta_eps = static_cast<A>(params[1]);
  const A min_radius = static_cast<A>(params[2]);
  const double momentum = params[3];
  const auto add = [](auto a, auto b) { return a + b; };
  const auto larger = [](A a, A b) { return a > b ? a : b; };
  // pass 1: the confidence threshold's sums; the trend update
  A p_total = 0, present_total = 0;
  int64_t rejected = 0;
  for (int64_t c = t; c < K; c += kStepThreads) {
    const ClassMeans<A> m = class_means(stats, K, c);
    p_total += m.present ? m.p_true : A(0);
    present_total += m.present ? A(1) : A(0);
    if (observe) {
      rejected += m.count > A(0) && !m.finite;
      const double ema = loss_ema[c], fall = fall_ema[c], loss = static_cast<double>(m.loss);
      const bool first = m.present && isnan(ema), seen = m.present && !isnan(ema);
      const double updated = momentum * ema + (1 - momentum) * loss;
      if (seen) {
        fall_ema[c] = momentum * fall + (1 - momentum) * (ema - updated);
        loss_ema[c] = updated;
      } else if (first) {
        loss_ema[c] = loss;
      }
    }
  }
  p_total = block_reduce(p_total, scratch, add);
  present_total = block_reduce(present_total, scratch, add);
  if (observe) {
    rejected = block_reduce(rejected, scratch_int, add);
    if (t == 0) *skipped += rejected;
  }
  const A thr = p_total / (present_total > A(1) ? present_total : A(1));
  __syncthreads();  // the trend state written above is read below by other threads
  // pass 2: the largest gap on each side of thr; the trend's mean fall over the classes seen
  A above_max = 0, below_max = 0;
  double fall_total = 0, seen_total = 0;
  for (int64_t c = t; c < K; c += kStepThreads) {
    const ClassMeans<A> m = class_means(stats, K, c);
    const A gap = m.present ? thr - m.p_true : A(0);
    above_max = larger(above_max, gap > A(0) ? gap : A(0));
    below_max = larger(below_max, gap < A(0) ? -gap : A(0));
    if (direction == 2) {
      fall_total += fall_ema[c];
      seen_total += isnan(loss_ema[c]) ? 0.0 : 1.0;
    }
  }
  above_max = block_reduce(above_max, scratch, larger);
  below_max = block_reduce(below_max, scratch, larger);
  fall_total = block_reduce(fall_total, scratch64, add);
  seen_total = block_reduce(seen_total, scratch64, add);
  const A largest = larger(above_max, below_max);
  const double mean_fall = fall_total / (seen_total > 1.0 ? seen_total : 1.0);  // unread when none is seen
  // pass 3: direction and radius
  for (int64_t c = t; c < K; c += kStepThreads) {
    const ClassMeans<A> m = class_means(stats, K, c);
    const A gap = m.present ? thr - m.p_true : A(0);
    A d, r;
    if (direction == 0) d = fixed_direction[c];
    else if (direction == 1) d = signum(gap);
    else d = isnan(loss_ema[c]) ? A(0) : static_cast<A>(signum(mean_fall - fall_ema[c]));
    if (radius == 0) {
      r = fixed_eps[c];
    } else if (radius == 1) {
      const A above = above_max > A(0) ? (gap > A(0) ? gap : A(0)) / above_max : A(0);
      const A below = below_max > A(0) ? (gap < A(0) ? -gap : A(0)) / below_max : A(0);
      r = larger(eps * (A(1) + delta_eps * (above + below)), min_radius);
    } else {
      r = larger(eps * (largest > A(0) ? (gap < A(0) ? -gap : gap) / largest : A(0)), min_radius);
    }
    direction_out[c] = d;
    eps_out[c] = r;
  }
  if (clear) {
    __syncthreads();  // every class's statistics are read above before any is zeroed
    for (int64_t i = t; i < 3 * K; i += kStepThreads) stats[i] = A(0);
  }
}

void checked_label_plan(const void* labels, int label_bytes, int64_t* safe, int64_t* loss_labels, bool* ok,
                        int64_t* bad_range, int64_t* plan, int64_t* cursor, int64_t B, int64_t K,
                        cudaStream_t stream) {
  const int64_t S = min64(B, K);
  if (label_bytes == 4) {
    checked_label_plan_kernel<int32_t><<<1, kStepThreads, 0, stream>>>(
        static_cast<const int32_t*>(labels), safe, loss_labels, ok, bad_range, plan, cursor, B, K, S);
  } else if (label_bytes == 8) {
    checked_label_plan_kernel<int64_t><<<1, kStepThreads, 0, stream>>>(
        static_cast<const int64_t*>(labels), safe, loss_labels, ok, bad_range, plan, cursor, B, K, S);
  } else {
    throw std::invalid_argument("checked_label_plan: labels must be int32 or int64");
  }
  check_launch("checked_label_plan_kernel");
}

void sorted_label_plan(const void* labels, int label_bytes, int64_t* safe, int64_t* loss_labels, bool* ok,
                       int64_t* bad_range, int64_t* plan, int64_t* sorted, int64_t B, int64_t K, cudaStream_t stream) {
  if (B < 1 || B > kSortedPlanMaxB) throw std::invalid_argument("sorted_label_plan: 1 to 4096 labels");
  const int64_t S = min64(B, K);
  int padded = 1;
  while (padded < B) padded *= 2;
  if (label_bytes == 4) {
    sorted_label_plan_kernel<int32_t><<<1, kStepThreads, 0, stream>>>(
        static_cast<const int32_t*>(labels), safe, loss_labels, ok, bad_range, plan, sorted, B, K, S, padded);
  } else if (label_bytes == 8) {
    sorted_label_plan_kernel<int64_t><<<1, kStepThreads, 0, stream>>>(
        static_cast<const int64_t*>(labels), safe, loss_labels, ok, bad_range, plan, sorted, B, K, S, padded);
  } else {
    throw std::invalid_argument("sorted_label_plan: labels must be int32 or int64");
  }
  check_launch("sorted_label_plan_kernel");
  class_starts_kernel<<<(K + kStepThreads) / kStepThreads, kStepThreads, 0, stream>>>(sorted, plan + B, B, K);
  check_launch("class_starts_kernel");
}

void class_stats(void* stats, const void* log_probs, const int64_t* labels, const bool* ok, int64_t B, int64_t K,
                 bool accumulate, int dtype, cudaStream_t stream) {
  if (K > 2147483647LL) throw std::invalid_argument("class_stats: too many classes");
  if (dtype == kFloat64) {
    class_stats_kernel<double><<<K, kStepThreads, 0, stream>>>(static_cast<double*>(stats),
        static_cast<const double*>(log_probs), labels, ok, B, K, accumulate);
  } else if (dtype == kFloat32) {
    class_stats_kernel<float><<<K, kStepThreads, 0, stream>>>(static_cast<float*>(stats),
        static_cast<const float*>(log_probs), labels, ok, B, K, accumulate);
  } else {
    throw std::invalid_argument("class_stats: statistics are float32 or float64");
  }
  check_launch("class_stats_kernel");
}

void policy(void* stats, const void* fixed_direction, const void* fixed_eps, double* loss_ema, double* fall_ema,
            int64_t* skipped, const double* params, void* direction_out, void* eps_out, int64_t K, int direction,
            int radius, bool observe, bool clear, int dtype, cudaStream_t stream) {
  if (dtype == kFloat64) {
    policy_kernel<double><<<1, kStepThreads, 0, stream>>>(static_cast<double*>(stats),
        static_cast<const double*>(fixed_direction), static_cast<const double*>(fixed_eps), loss_ema, fall_ema,
        skipped, params, static_cast<double*>(direction_out), static_cast<double*>(eps_out), K, direction, radius,
        observe, clear);
  } else if (dtype == kFloat32) {
    policy_kernel<float><<<1, kStepThreads, 0, stream>>>(static_cast<float*>(stats),
        static_cast<const float*>(fixed_direction), static_cast<const float*>(fixed_eps), loss_ema, fall_ema,
        skipped, params, static_cast<float*>(direction_out), static_cast<float*>(eps_out), K, direction, radius,
        observe, clear);
  } else {
    throw std::invalid_argument("policy: statistics are float32 or float64");
  }
  check_launch("policy_kernel");
}

}  // namespace lpa
