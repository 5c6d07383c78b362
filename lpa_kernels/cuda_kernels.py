"""Launchers of the CUDA C++ kernels (``csrc/``, module ``lpa_kernels._lpa_cuda``).

Same names, signatures and results as the Triton launchers (``lpa_kernels/*/triton_kernels.py``),
so one custom op serves both backends. Each launcher allocates its outputs with ``new_output``,
converts tensors to device pointers and dtype codes, and launches on the tensor's device and current
stream. Inputs arrive contiguous from the ops; labels are passed to the kernels as int64.

Per-class reductions are deterministic (no atomics): samples are ordered by a stable argsort of the
labels and each class is summed in that order. When classes x group tiles give too few blocks to
fill the GPU, each class's samples are split into ``splits`` shares whose partial sums are added by
a second small kernel, in a fixed order.
"""

from __future__ import annotations

import functools
import math

import torch

from lpa_kernels import _cuda_ext
from lpa_kernels._common import compute_dtype, new_output
from lpa_kernels.head_pgd.loop import HeadKernels, class_sum_from, run_head_pgd

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
MODE_CODES = {"add": 0, "scale": 1}
NORM_CODES = {"linf": 0, "l2": 1}
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
REDUCE_THREADS = 256  # kReduceThreads in csrc/class_reduce.cuh


def _code(dtype: torch.dtype) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"the CUDA kernels take float32, float16, bfloat16 or float64 tensors, got {dtype}")
    return DTYPE_CODES[dtype]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _launch(name: str, device: torch.device, *args) -> None:
    """Calls extension function ``name`` with ``args`` and the current stream of ``device``."""
    if device.type != "cuda":
        raise ValueError(f"the CUDA C++ kernels need CUDA tensors, got a {device.type} tensor")
    with torch.cuda.device(device):
        getattr(_cuda_ext.module(), name)(*args, torch.cuda.current_stream(device).cuda_stream)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _delta_for(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """delta as the kernels read it: in the data's dtype, or else in its accumulation dtype."""
    return delta.contiguous() if delta.dtype == dtype else _as(delta, compute_dtype(dtype))


def class_order(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` int64: sample indices sorted by class (stable, hence a fixed order) and
    ``offsets (K + 1,)`` with class c's samples at ``order[offsets[c]:offsets[c + 1]]``."""
    order = torch.argsort(labels, stable=True)
    offsets = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(torch.bincount(labels, minlength=num_classes), 0, out=offsets[1:])
    return order, offsets


def _multiprocessors(device: torch.device) -> int:
    return _multiprocessors_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def reduce_splits(device: torch.device, num_classes: int, groups: int, inner: int, samples: int, itemsize: int) -> int:
    """Sample shares per class so that the class-reduction grid has about 4 blocks per SM (a block
    covers up to 32 groups, each thread 16 bytes of them when inner == 1; see reduce_block in csrc)."""
    vector = 16 // itemsize if inner == 1 and groups % (16 // itemsize) == 0 else 1
    group_tile = 1 if inner > 1 else min(32, 1 << max(math.ceil(groups / vector) - 1, 0).bit_length()) * vector
    blocks = num_classes * math.ceil(groups / group_tile)
    wanted = 4 * _multiprocessors(device)
    return max(1, min(math.ceil(wanted / blocks), samples, 65535))


def _finish_class_sums(part: torch.Tensor, out: torch.Tensor) -> None:
    """``out (n,) = part (S, n).sum(0)`` in a fixed order, rounded once to ``out.dtype`` (nothing to do
    when the reduction wrote ``out`` itself)."""
    if part.data_ptr() != out.data_ptr():
        _launch("sum_partials", out.device, part.data_ptr(), _code(part.dtype), part.shape[0], out.numel(),
                out.data_ptr(), _code(out.dtype))


def perturb_forward(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, inner: int, mode: str) -> torch.Tensor:
    """``h (B, F)``, ``labels (B,)``, ``delta (K, D)`` contiguous -> ``h~ (B, F)`` in ``h.dtype``."""
    B, F = h.shape
    out = new_output((B, F), h.dtype, h.device)
    if out.numel() == 0:
        return out
    # Converted inputs are held in locals until the launch is queued: a temporary freed earlier could
    # be handed to another allocation and overwritten before the kernel reads it.
    kdelta, klabels = _delta_for(delta, h.dtype), _as(labels, torch.int64)
    _launch("perturb_forward", h.device, out.data_ptr(), h.data_ptr(), klabels.data_ptr(), kdelta.data_ptr(), B, F, delta.shape[1], inner, MODE_CODES[mode], _code(h.dtype), _code(kdelta.dtype))
    return out


def perturb_backward(
    grad_out: torch.Tensor,
    h: torch.Tensor | None,
    labels: torch.Tensor,
    delta: torch.Tensor | None,
    num_classes: int,
    per_class: int,
    inner: int,
    mode: str,
    need_grad_h: bool,
    deterministic: bool,
    grad_delta_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(grad_h (B, F) or None, grad_delta (K, D))`` in one pass over ``grad_out (B, F)``.

    ``h`` is needed for ``scale``; ``delta`` only when ``need_grad_h`` in ``scale``. ``grad_h`` has
    ``grad_out.dtype``, ``grad_delta`` has ``grad_delta_dtype``. Always deterministic (fixed order, no
    atomics), so ``deterministic`` changes nothing.
    """
    B, F = grad_out.shape
    scale = mode == "scale"
    grad_h = new_output((B, F), grad_out.dtype, grad_out.device) if need_grad_h else None
    grad_delta = new_output((num_classes, per_class), grad_delta_dtype, grad_out.device)
    if grad_delta.numel() == 0:
        return grad_h, grad_delta
    # One data dtype for the kernel: grad_out's, promoted with h's when scale mode reads h.
    kdtype = torch.promote_types(grad_out.dtype, h.dtype) if scale else grad_out.dtype
    acc = compute_dtype(kdtype)
    kgrad_out, kh = _as(grad_out, kdtype), _as(h, kdtype) if scale else None
    kdelta = _delta_for(delta, kdtype) if scale and need_grad_h else None
    kgrad_h = grad_h if grad_h is None or kdtype == grad_out.dtype else new_output((B, F), kdtype, grad_out.device)
    order, offsets = class_order(labels, num_classes)
    splits = reduce_splits(grad_out.device, num_classes, per_class, inner, B, kdtype.itemsize)
    direct = splits == 1 and grad_delta_dtype == acc
    part = grad_delta if direct else new_output((splits, num_classes, per_class), acc, grad_out.device)
    _launch("perturb_backward", grad_out.device, _ptr(kgrad_h), kgrad_out.data_ptr(), _ptr(kh), order.data_ptr(),
            offsets.data_ptr(), _ptr(kdelta), num_classes, F, per_class, inner, MODE_CODES[mode], _code(kdtype),
            _code(kdelta.dtype) if kdelta is not None else _code(kdtype), splits, part.data_ptr())
    _finish_class_sums(part.view(splits, -1), grad_delta)
    if kgrad_h is not grad_h:
        grad_h.copy_(kgrad_h)
    return grad_h, grad_delta


def pgd_step(
    delta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, eps: torch.Tensor, direction: torch.Tensor, norm: str
) -> None:
    """One PGD step on ``delta (K, D)`` (contiguous, in place) from ``grad (K, D)``; ``step``, ``eps``,
    ``direction`` are ``(K,)``."""
    K, D = delta.shape
    if delta.numel() == 0:
        return
    acc = compute_dtype(delta.dtype, grad.dtype)  # float64 when either is (pgd_step_'s rule)
    # The kernel computes in delta's accumulation dtype: a float64 gradient updates a float64 copy.
    kdelta = delta if compute_dtype(delta.dtype) == acc else _as(delta, acc)
    kgrad = grad.contiguous() if grad.dtype in (kdelta.dtype, acc) else _as(grad, acc)
    step, eps, direction = (_as(v, acc) for v in (step, eps, direction))
    _launch("pgd_step", delta.device, kdelta.data_ptr(), kgrad.data_ptr(), step.data_ptr(), eps.data_ptr(),
            direction.data_ptr(), K, D, NORM_CODES[norm], _code(kdelta.dtype), _code(kgrad.dtype))
    if kdelta is not delta:
        delta.copy_(kdelta)


def class_grad_pgd_step(
    delta: torch.Tensor,
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    h: torch.Tensor | None,
    step: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    inner: int,
    mode: str,
    norm: str,
) -> None:
    """``pgd_step(delta, class_grad(grad_out (B, F), labels, h), ...)`` in one launch, ``delta (K, D)``
    contiguous and updated in place."""
    K, D = delta.shape
    F = grad_out.shape[1]
    if delta.numel() == 0:
        return
    scale = mode == "scale"
    kdtype = torch.promote_types(grad_out.dtype, h.dtype) if scale else grad_out.dtype
    acc = compute_dtype(kdtype)
    kgrad_out, kh = _as(grad_out, kdtype), _as(h, kdtype) if scale else None
    # The kernel updates delta in grad_out's dtype or in the accumulation dtype; other dtypes go
    # through an accumulation-dtype copy, written back (rounded once).
    kdelta = delta if delta.dtype in (kdtype, acc) else _as(delta, acc)
    step, eps, direction = (_as(v, acc) for v in (step, eps, direction))
    workspace = torch.empty((K, D), dtype=acc, device=delta.device)
    order, offsets = class_order(labels, K)
    _launch("class_grad_pgd_step", delta.device, kdelta.data_ptr(), kgrad_out.data_ptr(), _ptr(kh), order.data_ptr(),
            offsets.data_ptr(), step.data_ptr(), eps.data_ptr(), direction.data_ptr(), K, F, D, inner,
            MODE_CODES[mode], NORM_CODES[norm], _code(kdtype), _code(kdelta.dtype), workspace.data_ptr())
    if kdelta is not delta:
        delta.copy_(kdelta)


def softmax_xent_grad(
    out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor | None,
    p_true: torch.Tensor | None,
) -> None:
    """``out = softmax(logits + shift[y]) - onehot(y)`` row by row, ``p_true`` the true class's
    probability (``HeadKernels.softmax_xent_grad``; ``out`` may be ``logits``)."""
    batch, num_classes = logits.shape
    klabels = _as(labels, torch.int64)
    _launch("softmax_xent_grad", logits.device, out.data_ptr(), _ptr(p_true), logits.data_ptr(), _ptr(shift),
            klabels.data_ptr(), batch, num_classes, _code(logits.dtype))


HEAD_KERNELS = HeadKernels(perturb=perturb_forward, class_sum=class_sum_from(perturb_backward), softmax_xent_grad=softmax_xent_grad,
                           pgd_step=pgd_step)


def head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode) -> None:
    """``steps`` PGD steps on ``delta (K, D)`` in place: ``head_pgd/loop.run_head_pgd`` on the CUDA C++
    kernels (GEMMs by cuBLAS); the Triton launcher's signature and results."""
    run_head_pgd(h, labels, weight, bias, delta, steps, step, eps, direction, norm, mode, HEAD_KERNELS)


def linear_perturb_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    rows_per_label: int,
    delta: torch.Tensor,
    activation: str,
    mode: str,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (M, N), preact (M, N))`` in ``x.dtype``; ``preact`` is an empty tensor unless ``save_preact``.

    ``x (M, IN)`` and ``weight (N, IN)`` contiguous, of one dtype; ``bias (N,)`` or None; ``labels (B,)``
    with ``M == B * rows_per_label``; ``delta (K, N)``. float16/bfloat16 run the tensor-core GEMM with
    the fused epilogue; float32/float64 (where tensor cores would lower the precision) take the
    product from ``torch.matmul`` and run the same epilogue as one elementwise kernel.
    """
    M, IN = x.shape
    N = weight.shape[0]
    out = new_output((M, N), x.dtype, x.device)
    preact = new_output((M, N), x.dtype, x.device) if save_preact else x.new_empty(0)
    if M == 0 or N == 0:
        return out, preact
    acc = compute_dtype(x.dtype)
    kbias, klabels, kdelta = _as(bias, acc), _as(labels, torch.int64), _as(delta, acc)
    epilogue = (_ptr(kbias), klabels.data_ptr(), kdelta.data_ptr())
    codes = (rows_per_label, ACTIVATION_CODES[activation], MODE_CODES[mode], _code(x.dtype))
    preact_ptr = preact.data_ptr() if save_preact else 0
    if x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype:
        _launch("linear_forward", x.device, out.data_ptr(), preact_ptr, x.data_ptr(), weight.data_ptr(), *epilogue,
                M, N, IN, *codes)
    else:
        product = torch.matmul(x, weight.to(x.dtype).t())
        _launch("linear_epilogue", x.device, out.data_ptr(), preact_ptr, product.data_ptr(), *epilogue, M, N, *codes)
    return out, preact


def linear_perturb_backward_epilogue(
    grad_out: torch.Tensor,
    preact: torch.Tensor,
    labels: torch.Tensor,
    rows_per_label: int,
    delta: torch.Tensor,
    activation: str,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_preact (M, N) in grad_out.dtype, grad_bias (N,), grad_delta (K, N))``.

    ``preact`` may be empty for activation "none" with mode "add", which never reads it. ``grad_bias``
    and ``grad_delta`` are float32 (float64 for float64 ``grad_out``), reduced in a fixed order.
    """
    M, N = grad_out.shape
    K, B = delta.shape[0], labels.shape[0]
    acc = compute_dtype(grad_out.dtype)
    grad_preact = new_output((M, N), grad_out.dtype, grad_out.device)
    grad_bias = new_output((N,), acc, grad_out.device)
    grad_delta = new_output((K, N), acc, grad_out.device)
    if M == 0 or N == 0:
        return grad_preact, grad_bias.zero_(), grad_delta.zero_()
    kpreact = _as(preact, grad_out.dtype) if preact.numel() > 0 else None
    kdelta = _as(delta, acc)
    order, offsets = class_order(labels, K)
    splits = reduce_splits(grad_out.device, K, N, 1, B, grad_out.dtype.itemsize)
    part_delta = grad_delta if splits == 1 else new_output((splits, K, N), acc, grad_out.device)
    part_bias = new_output((splits * K, N), acc, grad_out.device)
    _launch("linear_backward_epilogue", grad_out.device, grad_preact.data_ptr(), grad_out.data_ptr(),
            _ptr(kpreact), order.data_ptr(), offsets.data_ptr(), kdelta.data_ptr(), K, B, rows_per_label, N,
            ACTIVATION_CODES[activation], MODE_CODES[mode], _code(grad_out.dtype), splits, part_delta.data_ptr(),
            part_bias.data_ptr())
    _finish_class_sums(part_delta.view(splits, -1), grad_delta)
    _finish_class_sums(part_bias, grad_bias)
    return grad_preact, grad_bias, grad_delta
