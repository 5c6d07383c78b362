"""CUDA C++ launchers of ``perturb`` (``csrc/perturb.cu``): :class:`~lpa_kernels.perturb.backends.PerturbLaunchers`
on the extension. Shared launch plumbing, codes and the reduction split: ``lpa_kernels._cuda_launch``."""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels._common import class_order, compute_dtype, new_output


def perturb_forward(h, labels, delta, inner, mode):
    """``PerturbLaunchers.perturb_forward``."""
    B, F = h.shape
    out = new_output((B, F), h.dtype, h.device)
    if out.numel() == 0:
        return out
    # Converted inputs are held in locals until the launch is queued: a temporary freed earlier could
    # be handed to another allocation and overwritten before the kernel reads it.
    kdelta, klabels = cuda.delta_for(delta, h.dtype), cuda.as_dtype(labels, torch.int64)
    cuda.launch("perturb_forward", h.device, out.data_ptr(), h.data_ptr(), klabels.data_ptr(), kdelta.data_ptr(), B, F,
                delta.shape[1], inner, cuda.MODE_CODES[mode], cuda.code(h.dtype), cuda.code(kdelta.dtype))
    return out


def perturb_backward(grad_out, h, labels, delta, num_classes, per_class, inner, mode, need_grad_h, grad_delta_dtype,
                     plan=None):
    """``PerturbLaunchers.perturb_backward``."""
    B, F = grad_out.shape
    scale = mode == "scale"
    grad_h = new_output((B, F), grad_out.dtype, grad_out.device) if need_grad_h else None
    grad_delta = new_output((num_classes, per_class), grad_delta_dtype, grad_out.device)
    if grad_delta.numel() == 0:
        return grad_h, grad_delta
    # One data dtype for the kernel: grad_out's, promoted with h's when scale mode reads h, and float64 for a
    # float64 delta (its gradient sums in float64, as in every other float64 case; the kernel's accumulator
    # follows its data dtype, so the data is widened: a copy, for this unusual mix only)
    kdtype = torch.promote_types(grad_out.dtype, h.dtype) if scale else grad_out.dtype
    if grad_delta_dtype == torch.float64:
        kdtype = torch.float64
    acc = compute_dtype(kdtype)
    kgrad_out, kh = cuda.as_dtype(grad_out, kdtype), cuda.as_dtype(h, kdtype) if scale else None
    kdelta = cuda.delta_for(delta, kdtype) if scale and need_grad_h else None
    kgrad_h = grad_h if grad_h is None or kdtype == grad_out.dtype else new_output((B, F), kdtype, grad_out.device)
    order, offsets = class_order(labels, num_classes, plan)
    splits = cuda.reduce_splits(grad_out.device, num_classes, per_class, inner, B, kdtype.itemsize)
    direct = splits == 1 and grad_delta_dtype == acc
    part = grad_delta if direct else new_output((splits, num_classes, per_class), acc, grad_out.device)
    cuda.launch("perturb_backward", grad_out.device, cuda.ptr(kgrad_h), kgrad_out.data_ptr(), cuda.ptr(kh),
                order.data_ptr(), offsets.data_ptr(), cuda.ptr(kdelta), num_classes, F, per_class, inner,
                cuda.MODE_CODES[mode], cuda.code(kdtype), cuda.code(kdelta.dtype) if kdelta is not None else cuda.code(kdtype),
                splits, part.data_ptr())
    cuda.finish_class_sums(part.view(splits, -1), grad_delta)
    if kgrad_h is not grad_h:
        grad_h.copy_(kgrad_h)
    return grad_h, grad_delta
