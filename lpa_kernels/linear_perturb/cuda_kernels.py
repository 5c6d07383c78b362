"""CUDA C++ launchers of ``linear_perturb`` (``csrc/linear_perturb.cu``):
:class:`~lpa_kernels.linear_perturb.backends.LinearPerturbLaunchers` on the extension (plumbing in
``lpa_kernels._cuda_launch``).

float16/bfloat16 run the tensor-core GEMM with the fused epilogue; float32/float64 (where tensor cores
would lower the precision) take the product from ``torch.matmul`` and run the same epilogue as one
elementwise kernel. The backward epilogue reduces ``grad_bias`` and ``grad_delta`` in a fixed order.
"""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels._common import class_order, compute_dtype, new_output


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
        cuda.launch("linear_forward", x.device, out.data_ptr(), preact_ptr, x.data_ptr(), weight.data_ptr(),
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
