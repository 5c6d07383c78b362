// pybind11 module lpa_kernels._lpa_cuda: the launchers of kernels.h, taking device pointers, the
// stream handle and dtype codes as Python ints. It does not include or link torch (no C++ ABI tie);
// lpa_kernels/<op>/cuda_kernels.py (through lpa_kernels/_cuda_launch.py) turns tensors into these arguments. A failed launch raises
// RuntimeError naming the kernel; a bad argument raises ValueError.
#include <pybind11/pybind11.h>

#include <utility>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }
void* vptr(uintptr_t address) { return reinterpret_cast<void*>(address); }
cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// The runtime and driver versions, or the reason there is no usable GPU (never throws: the module
// must import and answer on a machine without a driver).
py::dict runtime_info() {
  py::dict info;
  int runtime = 0, driver = 0, devices = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  const cudaError_t err = cudaGetDeviceCount(&devices);
  cudaGetLastError();  // do not leave the error for the next launch check
  info["runtime_version"] = runtime;
  info["driver_version"] = driver;
  info["device_count"] = err == cudaSuccess ? devices : 0;
  info["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
  return info;
}

}  // namespace

PYBIND11_MODULE(_lpa_cuda, m) {
  m.doc() = "lpa_kernels CUDA kernels (raw-pointer launchers; see lpa_kernels/<op>/cuda_kernels.py)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const lpa::LaunchError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("runtime_info", &runtime_info);

  m.def("perturb_forward", [](uintptr_t out, uintptr_t h, uintptr_t labels, uintptr_t delta, int64_t B, int64_t F,
                              int64_t D, int64_t inner, int mode, int dtype, int delta_dtype, uintptr_t stream) {
    lpa::perturb_forward(vptr(out), vptr(h), ptr<const int64_t>(labels), vptr(delta), B, F, D, inner, mode, dtype,
                         delta_dtype, stream_of(stream));
  });
  m.def("perturb_backward", [](uintptr_t grad_h, uintptr_t grad_out, uintptr_t h, uintptr_t order, uintptr_t offsets,
                               uintptr_t delta, int64_t K, int64_t F, int64_t D, int64_t inner, int mode, int dtype,
                               int delta_dtype, int64_t splits, uintptr_t part, uintptr_t stream) {
    lpa::perturb_backward(vptr(grad_h), vptr(grad_out), vptr(h), ptr<const int64_t>(order),
                          ptr<const int64_t>(offsets), vptr(delta), K, F, D, inner, mode, dtype, delta_dtype, splits,
                          vptr(part), stream_of(stream));
  });
  m.def("sum_partials", [](uintptr_t part, int part_dtype, int64_t n_outer, int64_t n_inner, uintptr_t out,
                           int out_dtype, uintptr_t stream) {
    lpa::sum_partials(vptr(part), part_dtype, n_outer, n_inner, vptr(out), out_dtype, stream_of(stream));
  });
  m.def("pgd_step", [](uintptr_t delta, uintptr_t grad, uintptr_t step, uintptr_t eps, uintptr_t direction, int64_t K,
                       int64_t D, int norm, int dtype, int grad_dtype, uintptr_t ok, uintptr_t skipped, int64_t tile,
                       uintptr_t stats, uintptr_t rounded, uintptr_t stream) {
    lpa::pgd_step(vptr(delta), vptr(grad), vptr(step), vptr(eps), vptr(direction), K, D, norm, dtype, grad_dtype,
                  reinterpret_cast<const bool*>(ok), reinterpret_cast<int64_t*>(skipped), tile, vptr(stats),
                  vptr(rounded), stream_of(stream));
  });
  m.def("class_grad_pgd_step", [](uintptr_t delta, uintptr_t grad_out, uintptr_t h, uintptr_t order,
                                  uintptr_t offsets, uintptr_t step, uintptr_t eps, uintptr_t direction, int64_t K,
                                  int64_t F, int64_t D, int64_t inner, int mode, int norm, int dtype, int delta_dtype,
                                  int64_t splits, int64_t max_tiles, uintptr_t workspace, uintptr_t arrivals,
                                  uintptr_t stream) {
    lpa::class_grad_pgd_step(vptr(delta), vptr(grad_out), vptr(h), ptr<const int64_t>(order),
                             ptr<const int64_t>(offsets), vptr(step), vptr(eps), vptr(direction), K, F, D, inner, mode,
                             norm, dtype, delta_dtype, splits, max_tiles, vptr(workspace), ptr<int>(arrivals),
                             stream_of(stream));
  });
  m.def("checked_label_plan", [](uintptr_t labels, int label_bytes, uintptr_t safe, uintptr_t loss_labels, uintptr_t ok,
                                 uintptr_t bad_range, uintptr_t plan, uintptr_t cursor, int64_t B, int64_t K,
                                 uintptr_t stream) {
    lpa::checked_label_plan(vptr(labels), label_bytes, ptr<int64_t>(safe), ptr<int64_t>(loss_labels), ptr<bool>(ok),
                            ptr<int64_t>(bad_range), ptr<int64_t>(plan), ptr<int64_t>(cursor), B, K, stream_of(stream));
  });
  m.def("sorted_label_plan", [](uintptr_t labels, int label_bytes, uintptr_t safe, uintptr_t loss_labels, uintptr_t ok,
                                uintptr_t bad_range, uintptr_t plan, uintptr_t sorted, int64_t B, int64_t K,
                                uintptr_t stream) {
    lpa::sorted_label_plan(vptr(labels), label_bytes, ptr<int64_t>(safe), ptr<int64_t>(loss_labels), ptr<bool>(ok),
                           ptr<int64_t>(bad_range), ptr<int64_t>(plan), ptr<int64_t>(sorted), B, K, stream_of(stream));
  });
  m.def("class_stats", [](uintptr_t stats, uintptr_t log_probs, uintptr_t labels, uintptr_t ok, int64_t B, int64_t K,
                          bool accumulate, int dtype, uintptr_t stream) {
    lpa::class_stats(vptr(stats), vptr(log_probs), ptr<const int64_t>(labels), ptr<const bool>(ok), B, K, accumulate,
                     dtype, stream_of(stream));
  });
  m.def("policy", [](uintptr_t stats, uintptr_t fixed_direction, uintptr_t fixed_eps, uintptr_t loss_ema,
                     uintptr_t fall_ema, uintptr_t skipped, uintptr_t params, uintptr_t direction_out,
                     uintptr_t eps_out, int64_t K, int direction, int radius, bool observe, bool clear, int dtype, uintptr_t stream) {
    lpa::policy(vptr(stats), vptr(fixed_direction), vptr(fixed_eps), ptr<double>(loss_ema), ptr<double>(fall_ema),
                ptr<int64_t>(skipped), ptr<const double>(params), vptr(direction_out), vptr(eps_out), K, direction,
                radius, observe, clear, dtype, stream_of(stream));
  });
  m.def("softmax_xent_grad", [](uintptr_t out, uintptr_t p_true, uintptr_t logits, uintptr_t labels, int64_t B,
                                int64_t K, int dtype, uintptr_t stream) {
    lpa::softmax_xent_grad(vptr(out), vptr(p_true), vptr(logits), ptr<const int64_t>(labels), B, K, dtype,
                           stream_of(stream));
  });
  m.def("softmax_class_sum", [](uintptr_t sums, uintptr_t p_true, uintptr_t scratch, uintptr_t logits, uintptr_t shift,
                                uintptr_t order, uintptr_t starts, int64_t B, int64_t K, int dtype, uintptr_t stream) {
    lpa::softmax_class_sum(vptr(sums), vptr(p_true), vptr(scratch), vptr(logits), vptr(shift), ptr<const int64_t>(order),
                           ptr<const int64_t>(starts), B, K, dtype, stream_of(stream));
  });
  m.def("class_space_steps", [](uintptr_t current, uintptr_t base, uintptr_t weight, uintptr_t order, uintptr_t starts,
                                uintptr_t step, uintptr_t eps, uintptr_t direction, uintptr_t shift, uintptr_t sums,
                                uintptr_t grad, uintptr_t softmax, uintptr_t previous, uintptr_t ok, uintptr_t skipped,
                                int64_t B, int64_t K, int64_t D, int64_t steps, int norm, int dtype, uintptr_t stream) {
    lpa::class_space_steps(ptr<float>(current), vptr(base), vptr(weight), ptr<const int64_t>(order),
                           ptr<const int64_t>(starts), ptr<const float>(step), ptr<const float>(eps),
                           ptr<const float>(direction), ptr<float>(shift), vptr(sums), ptr<float>(grad),
                           ptr<float>(softmax), ptr<float>(previous), ptr<const bool>(ok), ptr<int64_t>(skipped), B, K,
                           D, steps, norm, dtype, stream_of(stream));
  });
  m.def("linear_forward", [](uintptr_t out, uintptr_t preact, uintptr_t x, uintptr_t weight, uintptr_t bias,
                             uintptr_t labels, uintptr_t delta, int64_t M, int64_t N, int64_t Kin,
                             int64_t rows_per_label, int activation, int mode, int dtype, uintptr_t stream) {
    lpa::linear_forward(vptr(out), vptr(preact), vptr(x), vptr(weight), vptr(bias), ptr<const int64_t>(labels),
                        vptr(delta), M, N, Kin, rows_per_label, activation, mode, dtype, stream_of(stream));
  });
  // The CUTLASS GEMMs take linear_forward's arguments.
  for (const auto& entry : {std::pair{"linear_forward_sm90", &lpa::linear_forward_sm90},
                             std::pair{"linear_forward_sm80", &lpa::linear_forward_sm80}}) {
    const auto launcher = entry.second;
    m.def(entry.first, [launcher](uintptr_t out, uintptr_t preact, uintptr_t x, uintptr_t weight, uintptr_t bias,
                                  uintptr_t labels, uintptr_t delta, int64_t M, int64_t N, int64_t Kin,
                                  int64_t rows_per_label, int activation, int mode, int dtype, uintptr_t stream) {
      launcher(vptr(out), vptr(preact), vptr(x), vptr(weight), vptr(bias), ptr<const int64_t>(labels), vptr(delta),
               M, N, Kin, rows_per_label, activation, mode, dtype, stream_of(stream));
    });
  }
  m.def("linear_sm90_missing", &lpa::linear_sm90_missing);
  m.def("linear_sm80_missing", &lpa::linear_sm80_missing);
  m.def("linear_epilogue", [](uintptr_t out, uintptr_t preact, uintptr_t z, uintptr_t bias, uintptr_t labels,
                              uintptr_t delta, int64_t M, int64_t N, int64_t rows_per_label, int activation, int mode,
                              int dtype, uintptr_t stream) {
    lpa::linear_epilogue(vptr(out), vptr(preact), vptr(z), vptr(bias), ptr<const int64_t>(labels), vptr(delta), M, N,
                         rows_per_label, activation, mode, dtype, stream_of(stream));
  });
  m.def("linear_backward_epilogue", [](uintptr_t grad_preact, uintptr_t grad_out, uintptr_t preact, uintptr_t order,
                                       uintptr_t offsets, uintptr_t delta, int64_t K, int64_t B,
                                       int64_t rows_per_label, int64_t N, int activation, int mode, int dtype,
                                       int64_t splits, uintptr_t part_delta, uintptr_t part_bias, uintptr_t stream) {
    lpa::linear_backward_epilogue(vptr(grad_preact), vptr(grad_out), vptr(preact), ptr<const int64_t>(order),
                                  ptr<const int64_t>(offsets), vptr(delta), K, B, rows_per_label, N, activation, mode,
                                  dtype, splits, vptr(part_delta), vptr(part_bias), stream_of(stream));
  });
}
