"""The definition of ``perturb`` and ``class_grad`` in plain PyTorch (the reference backend).

Shapes: ``h (B, *F)``, ``labels (B,)``, ``delta (K, *P)`` with ``P`` broadcastable to ``F``.
Arithmetic runs in float32 (float64 when an input is float64); the result is rounded once.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lpa_kernels._common import compute_dtype, padded_delta_shape


def perturb(h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, mode: str = "add") -> torch.Tensor:
    """``h + delta[y]`` (``add``) or ``h * (1 + delta[y])`` (``scale``), returned in ``h.dtype``."""
    cd = compute_dtype(h.dtype, delta.dtype)
    d = delta.reshape(padded_delta_shape(delta.shape, h.shape[1:])).index_select(0, labels).to(cd)
    out = h.to(cd) + d if mode == "add" else h.to(cd) * (1 + d)
    return out if out.dtype == h.dtype else out.to(h.dtype)


def class_grad(
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    delta_shape: Sequence[int],
    h: torch.Tensor | None = None,
    mode: str = "add",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``sum_{b: y_b = c} d h~_b / d delta_c``: the per-class sum of ``grad_out`` (times ``h`` for ``scale``),
    summed over the dimensions ``P`` broadcasts over. Shape ``(K, *P)``; classes absent from the batch get 0."""
    # float64 when any operand is: grad_out, h, or the delta whose gradient this is (out_dtype)
    cd = compute_dtype(grad_out.dtype, h.dtype if h is not None else grad_out.dtype, out_dtype or grad_out.dtype)
    g = grad_out.to(cd) if mode == "add" else grad_out.to(cd) * h.to(cd)
    padded = padded_delta_shape(delta_shape, grad_out.shape[1:])
    reduce_dims = [i + 1 for i, (p, f) in enumerate(zip(padded[1:], g.shape[1:])) if p == 1 and f != 1]
    if reduce_dims:
        g = g.sum(dim=reduce_dims, keepdim=True)
    g = g.reshape((g.shape[0],) + padded[1:])
    # out of place: under torch.func.vmap an in-place add of a batched g into unbatched zeros is refused
    total = torch.zeros(padded, dtype=cd, device=grad_out.device).index_add(0, labels, g)
    return total.reshape(tuple(delta_shape)).to(out_dtype or cd)
