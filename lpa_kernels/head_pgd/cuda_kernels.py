"""CUDA C++ launchers of ``head_pgd_`` (``csrc/head_pgd.cu``): :class:`~lpa_kernels.head_pgd.backends.HeadPGDLaunchers`,
``loop.run_head_pgd`` on the CUDA C++ ``perturb`` forward and ``pgd`` launchers plus two kernels of its own: the
row-wise softmax (rows form) and the softmax summed per class (class-space form); GEMMs by cuBLAS. With a given
direction and few classes, every class-space step runs in one launch instead (``csrc/head_pgd_fused.cu``)."""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels.head_pgd import triton_fused
from lpa_kernels.head_pgd.loop import FusedClassSpace, HeadKernels, run_head_pgd
from lpa_kernels.perturb.cuda_kernels import perturb_forward
from lpa_kernels.pgd.cuda_kernels import pgd_step, prepare_class_grad_pgd_step


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


def class_space_steps(current, base_logits, weight, labels, order, starts, step, eps, direction, steps: int,
                      norm: str, ok=None, skipped=None) -> None:
    """``HeadKernels.fused_class_space.run``, the CUDA twin of ``triton_fused.class_space_steps`` (same
    arguments; ``labels`` goes unused, the class order gives each sample's class); served by the same rule
    (``triton_fused.serves``: one block per 16 classes, so the same few-classes cost model)."""
    batch, num_classes = base_logits.shape
    buffers = triton_fused.scratch(batch, num_classes, weight.shape[1], weight.dtype, current.device, skipped is not None)
    cuda.launch("class_space_steps", current.device, current.data_ptr(), base_logits.data_ptr(), weight.data_ptr(),
                order.data_ptr(), starts.data_ptr(), step.data_ptr(), eps.data_ptr(), direction.data_ptr(),
                *(buffer.data_ptr() for buffer in buffers), cuda.ptr(ok), cuda.ptr(skipped), batch, num_classes,
                weight.shape[1], steps, cuda.NORM_CODES[norm], cuda.code(weight.dtype))


KERNELS = HeadKernels(perturb=perturb_forward, prepare_class_grad_pgd_step=prepare_class_grad_pgd_step,
                      softmax_xent_grad=softmax_xent_grad, softmax_class_sum=softmax_class_sum, pgd_step=pgd_step,
                      fused_class_space=FusedClassSpace(triton_fused.serves, class_space_steps))


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, plan=None, ok=None,
             skipped=None) -> None:
    """``HeadPGDLaunchers.head_pgd``."""
    run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, KERNELS, plan, ok, skipped)
