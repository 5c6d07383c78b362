// pybind11 module lpa_kernels._lpa_host: the host kernels of host_kernels.h on raw CPU pointers (Python
// ints from Tensor.data_ptr()) and sizes, with a dtype code (0 float32, 1 float64) and, for head_pgd, the
// labels' width in bytes (4 or 8). No torch C++ ABI; lpa_kernels/_host_ext.py turns tensors into these
// arguments after checking dtypes, devices and contiguity. A null pointer (0) is an absent optional.
#include <pybind11/pybind11.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "host_kernels.h"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void check_dtype(int dtype) {
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64)");
}

template <typename T>
void pgd_step_typed(uintptr_t delta, uintptr_t grad, uintptr_t step, uintptr_t eps, uintptr_t direction, int64_t K,
                    int64_t N, bool l2, double margin, uintptr_t ok, uintptr_t skipped) {
  lpa_host::pgd_step<T>(ptr<T>(delta), ptr<const T>(grad), ptr<const T>(step), ptr<const T>(eps),
                        ptr<const T>(direction), K, N, l2, T(margin), ptr<const bool>(ok), ptr<int64_t>(skipped));
}

template <typename T, typename Label>
void head_pgd_typed(uintptr_t h, uintptr_t labels, uintptr_t weight, uintptr_t bias, uintptr_t delta, int64_t B,
                    int64_t D, int64_t K, int64_t steps, uintptr_t step, uintptr_t eps, uintptr_t direction, bool l2,
                    bool scale, bool class_space, double margin, uintptr_t ok, uintptr_t skipped) {
  lpa_host::head_pgd<T, Label>(ptr<const T>(h), ptr<const Label>(labels), ptr<const T>(weight), ptr<const T>(bias),
                               ptr<T>(delta), B, D, K, steps, ptr<const T>(step), ptr<const T>(eps),
                               ptr<const T>(direction), l2, scale, class_space, T(margin), ptr<const bool>(ok),
                               ptr<int64_t>(skipped));
}

}  // namespace

namespace {

void check_label_bytes(int label_bytes) {
  if (label_bytes != 4 && label_bytes != 8) throw std::invalid_argument("label_bytes must be 4 (int32) or 8 (int64)");
}

// perturb's layout: a non-empty batch's F features are whole repeats of D blocks of `inner`.
void check_perturb_layout(int64_t B, int64_t F, int64_t D, int64_t inner) {
  if (B * F > 0 && (D < 1 || inner < 1 || F % (D * inner) != 0))
    throw std::invalid_argument("F must be a multiple of D * inner (D, inner >= 1)");
}

// head_loss's checks, then run(T(), Label()) for the dtype and label codes, without the GIL.
template <typename Run>
void dispatch_head_loss(int dtype, int label_bytes, int64_t B, int64_t K, const Run& run) {
  check_dtype(dtype);
  check_label_bytes(label_bytes);
  if (B < 1 || K < 1) throw std::invalid_argument("head_loss needs B >= 1 and K >= 1");
  py::gil_scoped_release unlocked;
  if (dtype == 0) label_bytes == 4 ? run(0.0f, int32_t()) : run(0.0f, int64_t());
  else label_bytes == 4 ? run(0.0, int32_t()) : run(0.0, int64_t());
}

// One policy call's arguments (step_update/naive.policy_), checked once at construction.
struct PolicyCall {
  int dtype;
  uintptr_t stats;
  int64_t K;
  uintptr_t loss_ema, fall_ema, skipped;
  lpa_host::PolicyParams params;
  int direction_kind, radius_kind;
  bool observe, clear;
  uintptr_t direction, radii;

  PolicyCall(int dtype, uintptr_t stats, int64_t K, uintptr_t loss_ema, uintptr_t fall_ema, uintptr_t skipped,
             lpa_host::PolicyParams params, int direction_kind, int radius_kind, bool observe, bool clear,
             uintptr_t direction, uintptr_t radii)
      : dtype(dtype), stats(stats), K(K), loss_ema(loss_ema), fall_ema(fall_ema), skipped(skipped), params(params),
        direction_kind(direction_kind), radius_kind(radius_kind), observe(observe), clear(clear),
        direction(direction), radii(radii) {
    check_dtype(dtype);
    if (direction_kind < 0 || direction_kind > 2 || radius_kind < 0 || radius_kind > 2)
      throw std::invalid_argument("direction and radius kinds are 0, 1 or 2");
    if ((direction_kind != lpa_host::kFixed && direction == 0) || (radius_kind != lpa_host::kFixed && radii == 0))
      throw std::invalid_argument("a direction or radius the policy computes needs its output");
    if ((direction_kind == lpa_host::kLossTrend || observe) && (loss_ema == 0 || fall_ema == 0))
      throw std::invalid_argument("the loss trend needs loss_ema and fall_ema");
    if (observe && skipped == 0) throw std::invalid_argument("observe needs skipped");
  }

  template <typename T> void run() const {
    lpa_host::policy<T>(ptr<T>(stats), K, ptr<double>(loss_ema), ptr<double>(fall_ema), ptr<int64_t>(skipped), params,
                        direction_kind, radius_kind, observe, clear, ptr<T>(direction), ptr<T>(radii));
  }
};

template <typename T, typename Label>
void perturb_forward_typed(uintptr_t h, uintptr_t labels, uintptr_t delta, uintptr_t out, int64_t B, int64_t F,
                           int64_t D, int64_t inner, bool scale) {
  lpa_host::perturb_forward<T, Label>(ptr<const T>(h), ptr<const Label>(labels), ptr<const T>(delta), ptr<T>(out), B,
                                      F, D, inner, scale);
}

template <typename T, typename Label>
void perturb_class_grad_typed(uintptr_t grad_out, uintptr_t h, uintptr_t labels, uintptr_t grad_delta, int64_t B,
                              int64_t F, int64_t K, int64_t D, int64_t inner, bool scale, double grad_scale) {
  lpa_host::perturb_class_grad<T, Label>(ptr<const T>(grad_out), ptr<const T>(h), ptr<const Label>(labels),
                                         ptr<T>(grad_delta), B, F, K, D, inner, scale, T(grad_scale));
}

}  // namespace

PYBIND11_MODULE(_lpa_host, m) {
  m.doc() = "lpa_kernels host (CPU) kernels of the reference backend (raw-pointer launchers; see _host_ext.py)";
  m.def("pgd_step", [](int dtype, uintptr_t delta, uintptr_t grad, uintptr_t step, uintptr_t eps, uintptr_t direction,
                       int64_t K, int64_t N, bool l2, double margin, uintptr_t ok, uintptr_t skipped) {
    check_dtype(dtype);
    if ((ok == 0) != (skipped == 0)) throw std::invalid_argument("ok and skipped are given together or not at all");
    py::gil_scoped_release unlocked;
    (dtype == 0 ? pgd_step_typed<float> : pgd_step_typed<double>)(delta, grad, step, eps, direction, K, N, l2, margin,
                                                                   ok, skipped);
  });
  m.def("head_pgd", [](int dtype, int label_bytes, uintptr_t h, uintptr_t labels, uintptr_t weight, uintptr_t bias,
                       uintptr_t delta, int64_t B, int64_t D, int64_t K, int64_t steps, uintptr_t step, uintptr_t eps,
                       uintptr_t direction, bool l2, bool scale, bool class_space, double margin, uintptr_t ok,
                       uintptr_t skipped) {
    check_dtype(dtype);
    if (label_bytes != 4 && label_bytes != 8) throw std::invalid_argument("label_bytes must be 4 (int32) or 8 (int64)");
    if (class_space && scale) throw std::invalid_argument("the class-space form serves mode add only");
    auto run = dtype == 0 ? (label_bytes == 4 ? head_pgd_typed<float, int32_t> : head_pgd_typed<float, int64_t>)
                          : (label_bytes == 4 ? head_pgd_typed<double, int32_t> : head_pgd_typed<double, int64_t>);
    py::gil_scoped_release unlocked;
    if (ok != 0 && skipped == 0) throw std::invalid_argument("ok needs skipped (the guard's counter)");
    run(h, labels, weight, bias, delta, B, D, K, steps, step, eps, direction, l2, scale, class_space, margin, ok,
        skipped);
  });
  m.def("class_stats", [](int dtype, int label_bytes, uintptr_t stats, uintptr_t log_probs, uintptr_t labels,
                          int64_t B, int64_t K, uintptr_t ok, bool accumulate) {
    check_dtype(dtype);
    if (label_bytes != 4 && label_bytes != 8) throw std::invalid_argument("label_bytes must be 4 (int32) or 8 (int64)");
    auto run = [&](auto zero, auto label) {
      using T = decltype(zero);
      using Label = decltype(label);
      return lpa_host::class_stats<T, Label>(ptr<T>(stats), ptr<const T>(log_probs), ptr<const Label>(labels), B, K,
                                             ptr<const bool>(ok), accumulate);
    };
    py::gil_scoped_release unlocked;
    if (dtype == 0) return label_bytes == 4 ? run(0.0f, int32_t()) : run(0.0f, int64_t());
    return label_bytes == 4 ? run(0.0, int32_t()) : run(0.0, int64_t());
  });
  m.def("policy", [](int dtype, uintptr_t stats, int64_t K, uintptr_t loss_ema, uintptr_t fall_ema, uintptr_t skipped,
                     double eps, double delta_eps, double min_radius, double momentum, int direction_kind,
                     int radius_kind, bool observe, bool clear, uintptr_t direction, uintptr_t radii) {
    const PolicyCall call{dtype, stats, K, loss_ema, fall_ema, skipped, {eps, delta_eps, min_radius, momentum},
                          direction_kind, radius_kind, observe, clear, direction, radii};
    py::gil_scoped_release unlocked;
    if (dtype == 0) call.run<float>();
    else call.run<double>();
  });
  // The single-pass step's update: the policy, then the guarded PGD step of delta (K, N) with its direction
  // and radii (the caller's fixed tensors for the fixed kinds), in one call. The PGD step's arguments are
  // pgd_step's; its eps and direction are the policy's outputs.
  m.def("policy_pgd_step", [](int dtype, uintptr_t stats, int64_t K, uintptr_t loss_ema, uintptr_t fall_ema,
                              uintptr_t stat_skipped, double eps, double delta_eps, double min_radius, double momentum,
                              int direction_kind, int radius_kind, bool observe, bool clear, uintptr_t delta,
                              uintptr_t grad, uintptr_t step, uintptr_t radii, uintptr_t direction, int64_t pgd_K,
                              int64_t N, bool l2, double margin, uintptr_t ok, uintptr_t skipped) {
    const PolicyCall call{dtype, stats, K, loss_ema, fall_ema, stat_skipped, {eps, delta_eps, min_radius, momentum},
                          direction_kind, radius_kind, observe, clear, direction, radii};
    if (direction == 0 || radii == 0) throw std::invalid_argument("the PGD step needs the direction and radii");
    if (pgd_K != K) throw std::invalid_argument("delta must have the policy's K rows");
    if (ok == 0 || skipped == 0) throw std::invalid_argument("the training step's PGD step is guarded: ok and skipped");
    py::gil_scoped_release unlocked;
    if (dtype == 0) {
      call.run<float>();
      pgd_step_typed<float>(delta, grad, step, radii, direction, K, N, l2, margin, ok, skipped);
    } else {
      call.run<double>();
      pgd_step_typed<double>(delta, grad, step, radii, direction, K, N, l2, margin, ok, skipped);
    }
  });
  // lpa/head_loss.py's class-space loss (host_kernels.h).
  m.def("head_loss_forward", [](int dtype, int label_bytes, uintptr_t logits0, uintptr_t labels, uintptr_t delta,
                                uintptr_t weight, uintptr_t shift, uintptr_t z, uintptr_t probs, uintptr_t loss,
                                uintptr_t stats, uintptr_t delta_copy, int64_t B, int64_t K, int64_t D) {
    bool done = false;
    dispatch_head_loss(dtype, label_bytes, B, K, [&](auto zero, auto label) {
      using T = decltype(zero);
      using Label = decltype(label);
      done = lpa_host::head_loss_forward<T, Label>(ptr<const T>(logits0), ptr<const Label>(labels),
                                                   ptr<const T>(delta), ptr<const T>(weight), ptr<const T>(shift),
                                                   ptr<T>(z), ptr<T>(probs), ptr<T>(loss), ptr<T>(stats),
                                                   ptr<T>(delta_copy), B, K, D);
    });
    if (!done) throw std::invalid_argument("head_loss: labels must lie in [0, K)");
  });
  m.def("head_loss_backward", [](int dtype, int label_bytes, uintptr_t probs, uintptr_t labels, uintptr_t delta,
                                 uintptr_t weight, uintptr_t grad_loss, uintptr_t grad_z,
                                 uintptr_t grad_logits0, uintptr_t grad_delta, uintptr_t grad_weight, int64_t B,
                                 int64_t K, int64_t D, double grad_scale) {
    dispatch_head_loss(dtype, label_bytes, B, K, [&](auto zero, auto label) {
      using T = decltype(zero);
      using Label = decltype(label);
      lpa_host::head_loss_backward<T, Label>(ptr<const T>(probs), ptr<const Label>(labels), ptr<const T>(delta),
                                             ptr<const T>(weight), *ptr<const T>(grad_loss),
                                             ptr<const T>(grad_z), ptr<T>(grad_logits0), ptr<T>(grad_delta),
                                             ptr<T>(grad_weight), B, K, D, T(grad_scale));
    });
  });
  // LPA_HOST_KERNELS as a C getenv: os.environ's writes reach the C environment (putenv/unsetenv), so this
  // sees them too, for a fraction of os.environ.get's cost (three Python frames, paid by every launcher call)
  m.def("switched_off", []() {
    const char* value = std::getenv("LPA_HOST_KERNELS");
    if (value == nullptr) return false;
    while (std::isspace(static_cast<unsigned char>(*value))) ++value;
    size_t length = std::strlen(value);
    while (length > 0 && std::isspace(static_cast<unsigned char>(value[length - 1]))) --length;
    return length == 1 && value[0] == '0';
  });
  m.def("label_range", [](int label_bytes, uintptr_t labels, int64_t B) {
    check_label_bytes(label_bytes);
    if (B < 1) throw std::invalid_argument("label_range needs B >= 1");
    int64_t lo = 0, hi = 0;
    {
      py::gil_scoped_release unlocked;
      if (label_bytes == 4) lpa_host::label_range(ptr<const int32_t>(labels), B, &lo, &hi);
      else lpa_host::label_range(ptr<const int64_t>(labels), B, &lo, &hi);
    }
    return py::make_tuple(lo, hi);
  });
  m.def("perturb_forward", [](int dtype, int label_bytes, uintptr_t h, uintptr_t labels, uintptr_t delta,
                              uintptr_t out, int64_t B, int64_t F, int64_t D, int64_t inner, bool scale) {
    check_dtype(dtype);
    check_label_bytes(label_bytes);
    check_perturb_layout(B, F, D, inner);
    auto run = dtype == 0 ? (label_bytes == 4 ? perturb_forward_typed<float, int32_t>
                                              : perturb_forward_typed<float, int64_t>)
                          : (label_bytes == 4 ? perturb_forward_typed<double, int32_t>
                                              : perturb_forward_typed<double, int64_t>);
    py::gil_scoped_release unlocked;
    run(h, labels, delta, out, B, F, D, inner, scale);
  });
  m.def("perturb_class_grad", [](int dtype, int label_bytes, uintptr_t grad_out, uintptr_t h, uintptr_t labels,
                                 uintptr_t grad_delta, int64_t B, int64_t F, int64_t K, int64_t D, int64_t inner,
                                 bool scale, double grad_scale) {
    check_dtype(dtype);
    check_label_bytes(label_bytes);
    check_perturb_layout(B, F, D, inner);
    if (scale && h == 0 && B * F > 0) throw std::invalid_argument("mode scale needs h");
    auto run = dtype == 0 ? (label_bytes == 4 ? perturb_class_grad_typed<float, int32_t>
                                              : perturb_class_grad_typed<float, int64_t>)
                          : (label_bytes == 4 ? perturb_class_grad_typed<double, int32_t>
                                              : perturb_class_grad_typed<double, int64_t>);
    py::gil_scoped_release unlocked;
    run(grad_out, h, labels, grad_delta, B, F, K, D, inner, scale, grad_scale);
  });
}
