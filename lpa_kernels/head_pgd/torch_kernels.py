"""PyTorch :class:`~lpa_kernels.head_pgd.loop.HeadKernels`: ``loop.run_head_pgd``'s algebra in a few torch
ops per step, for the reference backend (the CPU, and any device without a fast backend).

``naive.head_pgd_`` (the definition the tests compare against) runs autograd through ``perturb``,
``F.linear`` and ``cross_entropy`` in every step, about 60 ATen ops; here a class-space step is two
GEMMs, a softmax, its per-class sum by ``index_add_`` and the reference ``pgd_step_``, and a rows step
the same with the reference ``perturb`` and ``class_grad_pgd_step_``. ``index_add_`` is sequential on the CPU
(a fixed order); on a GPU it adds with atomics, as the autograd backward of ``naive.py`` does, so the
reference backend is not bitwise reproducible there, as before. No label plan: nothing sorts the labels.

On CPU float32/float64 tensors the whole call runs instead in the host C++ kernel (``_host_ext``: the
same algebra without per-op dispatch, ~200 ATen ops fewer for T = 3) when it is built.
"""

from __future__ import annotations

import torch

from lpa_kernels import _host_ext
from lpa_kernels._common import compute_dtype
from lpa_kernels.head_pgd import loop
from lpa_kernels.head_pgd.loop import HeadKernels, run_head_pgd
from lpa_kernels.perturb import naive as perturb_naive
from lpa_kernels.pgd import naive as pgd_naive


def perturb(h, labels, delta, inner, mode):
    """``HeadKernels.perturb`` (``inner`` is 1: delta is ``(K, D)`` over ``h (n, D)``)."""
    return perturb_naive.perturb(h, labels, delta, mode)


def prepare_class_grad_pgd_step(delta, rows, labels, h, inner, mode, norm, plan=None):
    """``HeadKernels.prepare_class_grad_pgd_step`` (the reference's class sum, then its update; ``inner`` is 1)."""
    return lambda step, eps, direction: pgd_naive.class_grad_pgd_step_(delta, rows, labels, step, eps, direction,
                                                                       norm, h, mode)


def _probabilities_minus_onehot(logits, labels, shift, p_true, acc):
    """``softmax(logits + shift[y]) - onehot(y)`` in ``acc`` (a new tensor), the true class's probability
    into ``p_true`` when given."""
    z = logits.to(acc) if shift is None else torch.index_select(shift, 0, labels).to(acc).add_(logits)
    probs = torch.softmax(z, dim=1)
    column = labels.long()[:, None]
    true_prob = torch.gather(probs, 1, column)
    if p_true is not None:
        p_true.copy_(true_prob[:, 0])
    return probs.scatter_(1, column, true_prob.sub_(1))


def softmax_xent_grad(out, logits, labels, p_true) -> None:
    """``HeadKernels.softmax_xent_grad``."""
    out.copy_(_probabilities_minus_onehot(logits, labels, None, p_true, compute_dtype(logits.dtype)))


def softmax_class_sum(sums, logits, shift, labels, order, starts, p_true, scratch) -> None:
    """``HeadKernels.softmax_class_sum`` (``order``, ``starts`` unused; ``scratch`` only gives the dtype)."""
    grad = _probabilities_minus_onehot(logits, labels, shift, p_true, scratch.dtype)
    total = sums if sums.dtype == grad.dtype else torch.empty(sums.shape, dtype=grad.dtype, device=grad.device)
    total.zero_().index_add_(0, labels, grad)
    if sums.dtype == torch.float16:
        ones = grad.new_ones(()).expand(labels.shape[0])
        counts = torch.zeros(sums.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, labels, ones)
        total.mul_(class_sum_scale(counts)[:, None])
    if total is not sums:
        sums.copy_(total)


def class_sum_scale(counts: torch.Tensor) -> torch.Tensor:
    """``HeadKernels.softmax_class_sum``'s per-class scale of float16 sums, ``1 / 2^floor(log2 n)`` (1 for
    n < 2), exactly: with ``n = m * 2^e``, ``m`` in [0.5, 1), it is ``2^(1 - e)``."""
    return torch.ldexp(torch.ones_like(counts), 1 - torch.frexp(counts.clamp_min(1)).exponent)


def pgd_step(delta, grad, step, eps, direction, norm, rounded=None) -> None:
    """``HeadKernels.pgd_step``: the reference update, then ``rounded``'s copy."""
    pgd_naive.pgd_step_(delta, grad, step, eps, direction, norm)
    if rounded is not None:
        rounded.copy_(delta)


KERNELS = HeadKernels(perturb=perturb, prepare_class_grad_pgd_step=prepare_class_grad_pgd_step,
                      softmax_xent_grad=softmax_xent_grad, softmax_class_sum=softmax_class_sum,
                      pgd_step=pgd_step, uses_label_plan=False, updates_every_row=True)


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, ok=None,
             skipped=None) -> _host_ext.BoundCall | None:
    """``HeadPGDLaunchers.head_pgd`` (no plan) on these kernels, for the reference backend (the host
    kernel when it serves the tensors: returned bound, ``_host_ext.head_pgd``; else None); with ``skipped``,
    under ``loop.guarded``."""
    class_space = loop.call_dtypes_and_form(h, weight, delta, steps, mode, norm)[2]
    bound = _host_ext.head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, class_space, ok,
                               skipped)
    if bound is None:
        run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, KERNELS, None, ok, skipped)
    return bound
