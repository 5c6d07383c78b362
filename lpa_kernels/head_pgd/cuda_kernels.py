"""CUDA C++ launchers of ``head_pgd_`` (``csrc/head_pgd.cu``): :class:`~lpa_kernels.head_pgd.backends.HeadPGDLaunchers`,
``loop.run_head_pgd`` on the CUDA C++ ``perturb`` forward and ``pgd`` launchers plus two kernels of its own: the
row-wise softmax (rows form) and the softmax summed per class (class-space form); GEMMs by cuBLAS."""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels.head_pgd.loop import HeadKernels, run_head_pgd
from lpa_kernels.perturb.cuda_kernels import perturb_forward
from lpa_kernels.pgd.cuda_kernels import class_grad_pgd_step, pgd_step


def softmax_xent_grad(out, logits, labels, p_true) -> None:
    """``HeadKernels.softmax_xent_grad``: ``out = softmax(logits) - onehot(y)`` row by row, ``p_true`` the
    true class's probability (``out`` may be ``logits``)."""
    batch, num_classes = logits.shape
    klabels = cuda.as_dtype(labels, torch.int64)
    cuda.launch("softmax_xent_grad", logits.device, out.data_ptr(), cuda.ptr(p_true), logits.data_ptr(),
                klabels.data_ptr(), batch, num_classes, cuda.code(logits.dtype))


def softmax_class_sum(sums, logits, shift, labels, order, starts, p_true, scratch) -> None:
    """``HeadKernels.softmax_class_sum``: one block per class (``order``, ``starts`` int64, from the label plan)."""
    batch, num_classes = logits.shape
    cuda.launch("softmax_class_sum", logits.device, sums.data_ptr(), cuda.ptr(p_true), scratch.data_ptr(),
                logits.data_ptr(), shift.data_ptr(), order.data_ptr(), starts.data_ptr(), batch, num_classes,
                cuda.code(logits.dtype))


KERNELS = HeadKernels(perturb=perturb_forward, class_grad_pgd_step=class_grad_pgd_step,
                      softmax_xent_grad=softmax_xent_grad, softmax_class_sum=softmax_class_sum, pgd_step=pgd_step)


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, plan=None) -> None:
    """``HeadPGDLaunchers.head_pgd``."""
    run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, KERNELS, plan)
