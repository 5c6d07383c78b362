"""CUDA C++ launchers of ``linear_perturb`` (``csrc/linear_perturb*.cu``):
:class:`~lpa_kernels.linear_perturb.backends.LinearPerturbLaunchers` on the extension (plumbing in
``lpa_kernels._cuda_launch``).

float16/bfloat16 run a tensor-core GEMM with the fused epilogue, chosen by ``LPA_CUDA_LINEAR_GEMM``:
- ``wmma`` (the default): the ``wmma`` kernel of ``csrc/linear_perturb.cu``, any GPU from sm_80, any shape;
- ``cutlass``: CUTLASS 3's sm_90a TMA + WGMMA kernel (``csrc/linear_perturb_sm90.cu``) on sm_90 GPUs
  and its cp.async + mma.sync multistage kernel (``csrc/linear_perturb_sm80.cu``) on sm_8x GPUs, for
  operands their 16-byte loads can read (``in_features`` a positive multiple of 8, 16-byte aligned x and
  weight); the wmma kernel for other shapes and GPUs;
- ``cutlass_sm80``: the multistage kernel on sm_8x and sm_90 alike (how a Hopper GPU tests it).
The wmma kernel stays the default until the CUTLASS kernels have passed the GPU tests.
float32/float64 (where tensor cores would lower the precision) take the product from ``torch.matmul``
and run the same epilogue as one elementwise kernel. The backward epilogue reduces ``grad_bias`` and
``grad_delta`` in a fixed order.
"""

from __future__ import annotations

import os

import torch

from lpa_kernels import _cuda_build, _cuda_ext, _cuda_launch as cuda
from lpa_kernels._common import class_order, compute_dtype, new_output

GEMM_CHOICES = ("wmma", "cutlass", "cutlass_sm80")
CUTLASS_GEMMS = ("sm90", "sm80")  # linear_forward_<name> in the extension


def chosen_gemm() -> str:
    """``LPA_CUDA_LINEAR_GEMM`` (one of ``GEMM_CHOICES``, "wmma" when unset), checked."""
    choice = os.environ.get("LPA_CUDA_LINEAR_GEMM", "").strip() or "wmma"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"LPA_CUDA_LINEAR_GEMM must be one of {GEMM_CHOICES}, got {choice!r}")
    return choice


def cutlass_gemm_missing(name: str) -> str:
    """Why the extension has no CUTLASS GEMM ``name`` ("sm90" or "sm80"): "" when it has it."""
    if not _cuda_ext.is_built():
        return "the CUDA extension is not built"
    return _cuda_build.CUTLASS_GEMM_REASONS.get(getattr(_cuda_ext.module(), f"linear_{name}_missing")(), "")


def gemm_info() -> dict:
    """For ``backend_info()``: for each CUTLASS GEMM, whether the extension has it and why not; and
    which GEMM family ``LPA_CUDA_LINEAR_GEMM`` selects."""
    info = {f"cutlass_{name}": {"built": not (why := cutlass_gemm_missing(name)), "reason": why} for name in CUTLASS_GEMMS}
    return {**info, "selected": chosen_gemm()}


def _gemm_launcher(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The extension function that runs this 16-bit product (see the module doc); asking for a CUTLASS
    GEMM the extension lacks, on a GPU it is for, raises."""
    choice = chosen_gemm()
    if choice == "wmma":
        return "linear_forward"
    major, minor = torch.cuda.get_device_capability(x.device)
    if choice == "cutlass" and (major, minor) == (9, 0):
        name = "sm90"
    elif major == 8 or (choice == "cutlass_sm80" and (major, minor) == (9, 0)):
        name = "sm80"
    else:
        return "linear_forward"
    missing = cutlass_gemm_missing(name)
    if missing:
        raise ValueError(f"LPA_CUDA_LINEAR_GEMM={choice}: no CUTLASS {name} GEMM in the extension: {missing}")
    # 16-byte operand loads along K, at least one K step, int32 problem shapes.
    loadable = x.shape[1] > 0 and x.shape[1] % 8 == 0 and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    return f"linear_forward_{name}" if loadable and max(*x.shape, weight.shape[0]) < 2**31 else "linear_forward"


def linear_perturb_forward(x, weight, bias, labels, rows_per_label, delta, activation, mode, save_preact):
    """``LinearPerturbLaunchers.linear_perturb_forward``."""
    M, IN = x.shape
    N = weight.shape[0]
    out = new_output((M, N), x.dtype, x.device)
    preact = new_output((M, N), x.dtype, x.device) if save_preact else x.new_empty(0)
    if M == 0 or N == 0:
        return out, preact
    acc = compute_dtype(x.dtype)
    kbias, klabels, kdelta = cuda.as_dtype(bias, acc), cuda.as_dtype(labels, torch.int64), cuda.as_dtype(delta, acc)
    epilogue = (cuda.ptr(kbias), klabels.data_ptr(), kdelta.data_ptr())
    codes = (rows_per_label, cuda.ACTIVATION_CODES[activation], cuda.MODE_CODES[mode], cuda.code(x.dtype))
    preact_ptr = preact.data_ptr() if save_preact else 0
    if x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype:
        cuda.launch(_gemm_launcher(x, weight), x.device, out.data_ptr(), preact_ptr, x.data_ptr(), weight.data_ptr(),
                    *epilogue, M, N, IN, *codes)
    else:
        product = torch.matmul(x, weight.to(x.dtype).t())
        cuda.launch("linear_epilogue", x.device, out.data_ptr(), preact_ptr, product.data_ptr(), *epilogue, M, N,
                    *codes)
    return out, preact


def linear_perturb_backward_epilogue(grad_out, preact, labels, rows_per_label, delta, activation, mode):
    """``LinearPerturbLaunchers.linear_perturb_backward_epilogue``."""
    M, N = grad_out.shape
    K, B = delta.shape[0], labels.shape[0]
    acc = compute_dtype(grad_out.dtype)
    grad_preact = new_output((M, N), grad_out.dtype, grad_out.device)
    grad_bias = new_output((N,), acc, grad_out.device)
    grad_delta = new_output((K, N), acc, grad_out.device)
    if M == 0 or N == 0:
        return grad_preact, grad_bias.zero_(), grad_delta.zero_()
    kpreact = cuda.as_dtype(preact, grad_out.dtype) if preact.numel() > 0 else None
    kdelta = cuda.as_dtype(delta, acc)
    order, offsets = class_order(labels, K)
    splits = cuda.reduce_splits(grad_out.device, K, N, 1, B, grad_out.dtype.itemsize)
    part_delta = grad_delta if splits == 1 else new_output((splits, K, N), acc, grad_out.device)
    part_bias = new_output((splits * K, N), acc, grad_out.device)
    cuda.launch("linear_backward_epilogue", grad_out.device, grad_preact.data_ptr(), grad_out.data_ptr(),
                cuda.ptr(kpreact), order.data_ptr(), offsets.data_ptr(), kdelta.data_ptr(), K, B, rows_per_label, N,
                cuda.ACTIVATION_CODES[activation], cuda.MODE_CODES[mode], cuda.code(grad_out.dtype), splits,
                part_delta.data_ptr(), part_bias.data_ptr())
    cuda.finish_class_sums(part_delta.view(splits, -1), grad_delta)
    cuda.finish_class_sums(part_bias, grad_bias)
    return grad_preact, grad_bias, grad_delta
