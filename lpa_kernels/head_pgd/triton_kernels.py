"""Triton fast path of ``head_pgd_``: T PGD steps on delta for a linear classifier head, no autograd.

For ``logits = perturb(h, y, delta) @ W.T + b`` and summed cross-entropy, the gradient with respect to
the perturbed activations is ``(softmax(logits) - onehot(y)) @ W``, so one PGD step is

    grad[c] = sum_{b: y_b = c} ((softmax(h~_b @ W.T + b) - onehot(y_b)) @ W)  (* h_b for ``scale``)
    delta   = pgd_step(delta, grad)

Each step is two launches:

1. ``_head_class_grad_kernel`` (one program per batch tile and per chunk of output features): the
   logits tile GEMM with the class perturbation applied to the h tile as it is loaded, an online
   softmax over K in tiles (flash-attention style: the running ``p @ W`` accumulator is rescaled when
   the row maximum grows), the onehot term read as the row ``W[y_b]``, and the per-class reduction of
   the sample gradients into ``grad (K, D)`` with fp32/fp64 atomics. No ``(B, K)`` tensor is written
   (only, on the first step of the ``"confidence"`` rule, the ``(B,)`` true-class probabilities).
   The reduction uses atomics rather than per-tile partials: a batch tile touches few classes, so
   ``(tiles, K, D)`` partials would be mostly zeros, and sorting samples into class-pure tiles wastes
   the GEMM on small classes. Atomics make the summation order, and so the last bits, vary from run
   to run.
2. ``lpa_kernels.pgd.triton_kernels.pgd_step``: the projected update. It needs every batch tile's
   contribution to a class, and for ``l2`` the norm over all of its features, so it cannot run before
   the whole first grid has finished; Triton has no grid-wide barrier, hence a second (tiny) launch.

The dot products run on fp32 (fp64 for fp64 input) operands with IEEE precision: ``linf`` PGD takes
the sign of each gradient entry, so rounding ``h~`` or ``p`` to 16 bits (or TF32) would flip signs the
reference does not. The GEMMs are small (``B x K x D`` per step), so this costs little.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpa_kernels._common import compute_dtype
from lpa_kernels.head_pgd.loop import run_pgd_loop
from lpa_kernels.perturb.triton_kernels import kernel_dtype_view
from lpa_kernels.pgd.triton_kernels import pgd_step


@triton.jit
def _head_class_grad_kernel(
    h_ptr,  # (B, D) contiguous
    labels_ptr,  # (B,) int32/int64
    weight_ptr,  # (K, D) contiguous
    bias_ptr,  # (K,) or a dummy when HAS_BIAS is False
    delta_ptr,  # (K, D) contiguous, in the accumulation dtype
    grad_ptr,  # (K, D) zero-filled, accumulation dtype: receives the class-summed gradient
    p_true_ptr,  # (B,) accumulation dtype: softmax probability of the true class (when WRITE_P_TRUE)
    B,
    K,
    D,
    SCALE: tl.constexpr,  # mode == "scale": h~ = h * (1 + delta[y]); else h~ = h + delta[y]
    HAS_BIAS: tl.constexpr,
    WRITE_P_TRUE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_out = tl.program_id(1)
    acc_dtype = delta_ptr.dtype.element_ty

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    # Padded rows read class 0 (valid memory); their results are masked out of every store.
    y = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    rows = rows.to(tl.int64)
    out_cols = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = out_cols < D

    row_max = tl.full((BLOCK_B,), float("-inf"), dtype=acc_dtype)
    row_sum = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    true_logit = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    p_w = tl.zeros((BLOCK_B, BLOCK_OUT), dtype=acc_dtype)  # sum_k exp(logit_k - row_max) W[k, out_cols]

    for k0 in range(0, K, BLOCK_K):
        classes = k0 + tl.arange(0, BLOCK_K)
        class_ok = classes < K
        classes = classes.to(tl.int64)

        # logits tile (BLOCK_B, BLOCK_K) = h~ @ W.T over all of D, perturbation applied on load.
        logits = tl.zeros((BLOCK_B, BLOCK_K), dtype=acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            tile_ok = row_ok[:, None] & col_ok[None, :]
            h = tl.load(h_ptr + rows[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(acc_dtype)
            d = tl.load(delta_ptr + y[:, None] * D + cols[None, :], mask=tile_ok, other=0.0)
            h_tilde = h * (1.0 + d) if SCALE else h + d
            w_t = tl.load(weight_ptr + classes[None, :] * D + cols[:, None],
                          mask=col_ok[:, None] & class_ok[None, :], other=0.0).to(acc_dtype)
            logits = tl.dot(h_tilde, w_t, logits, input_precision="ieee", out_dtype=acc_dtype)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + classes, mask=class_ok, other=0.0).to(acc_dtype)[None, :]
        logits = tl.where(class_ok[None, :], logits, float("-inf"))
        true_logit += tl.sum(tl.where(classes[None, :] == y[:, None], logits, 0.0), axis=1)

        # Online softmax: K = 0..k0+BLOCK_K seen so far; the first tile always holds class 0, so
        # new_max is finite and exp(-inf - new_max) = 0 rescales the empty start away.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        rescale = tl.exp(row_max - new_max)
        expo = tl.exp(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(expo, axis=1)
        w_out = tl.load(weight_ptr + classes[:, None] * D + out_cols[None, :],
                        mask=class_ok[:, None] & out_ok[None, :], other=0.0).to(acc_dtype)
        p_w = tl.dot(expo, w_out, p_w * rescale[:, None], input_precision="ieee", out_dtype=acc_dtype)
        row_max = new_max

    # d loss / d h~ = softmax @ W - W[y]; then d h~ / d delta is 1 (add) or h (scale).
    out_mask = row_ok[:, None] & out_ok[None, :]
    w_true = tl.load(weight_ptr + y[:, None] * D + out_cols[None, :], mask=out_mask, other=0.0).to(acc_dtype)
    sample_grad = p_w / row_sum[:, None] - w_true
    if SCALE:
        sample_grad *= tl.load(h_ptr + rows[:, None] * D + out_cols[None, :], mask=out_mask, other=0.0).to(acc_dtype)
    tl.atomic_add(grad_ptr + y[:, None] * D + out_cols[None, :], sample_grad, mask=out_mask)

    if WRITE_P_TRUE:
        if pid_out == 0:
            tl.store(p_true_ptr + rows, tl.exp(true_logit - row_max) / row_sum, mask=row_ok)


def _block_sizes(batch: int, features: int) -> tuple[int, int, int, int]:
    """``(BLOCK_B, BLOCK_K, BLOCK_D, BLOCK_OUT)``; every block is at least 16, tl.dot's minimum.

    A program holds a ``(BLOCK_B, BLOCK_OUT)`` accumulator for ``p @ W`` and a ``(BLOCK_K, BLOCK_OUT)``
    tile of W, sized to stay in registers with 4 warps. D wider than BLOCK_OUT is split over programs,
    each recomputing the logits: that multiplies the small logits GEMM but also gives a small batch
    enough programs to fill the GPU. BLOCK_K does not depend on K, so one compiled kernel serves any
    class count. Not tuned on a GPU yet."""
    block_b = min(32, max(16, triton.next_power_of_2(batch)))
    block_d = min(64, max(16, triton.next_power_of_2(features)))
    block_out = min(128, max(16, triton.next_power_of_2(features)))
    return block_b, 64, block_d, block_out


def head_pgd(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    steps: int,
    step: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor | None,
    norm: str,
    mode: str,
) -> None:
    """``steps`` PGD steps on ``delta (K, D)`` in place (validated, contiguous tensors on one device).

    ``h (B, D)``, ``labels (B,)``, ``weight (K, D)``, ``bias (K,)`` or None; ``step``, ``eps`` (K,);
    ``direction`` (K,) or None for LPL's confidence rule, fixed from the first step's softmax. The
    iterate stays in the accumulation dtype between steps and is rounded into ``delta`` once."""
    batch, features = h.shape
    num_classes = weight.shape[0]
    if batch == 0 or steps == 0:
        return
    acc = compute_dtype(h.dtype, weight.dtype, delta.dtype)
    h, weight, bias = kernel_dtype_view(h), kernel_dtype_view(weight), kernel_dtype_view(bias)
    grad = torch.empty((num_classes, features), dtype=acc, device=delta.device)
    block_b, block_k, block_d, block_out = _block_sizes(batch, features)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(features, block_out))

    def class_grad(current: torch.Tensor, p_true: torch.Tensor | None) -> torch.Tensor:
        grad.zero_()  # the kernel accumulates into it
        _head_class_grad_kernel[grid](
            h, labels, weight, weight if bias is None else bias, current, grad, grad if p_true is None else p_true,
            batch, num_classes, features,
            SCALE=mode == "scale", HAS_BIAS=bias is not None, WRITE_P_TRUE=p_true is not None,
            BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_OUT=block_out,
        )
        return grad

    run_pgd_loop(delta, labels, steps, step, eps, direction, norm, acc, class_grad, pgd_step)
