"""CUDA C++ launchers of ``pgd_step_`` and ``class_grad_pgd_step_`` (``csrc/pgd.cu``):
:class:`~lpa_kernels.pgd.backends.PGDLaunchers` on the extension (plumbing in ``lpa_kernels._cuda_launch``)."""

from __future__ import annotations

import torch

from lpa_kernels import _cuda_launch as cuda
from lpa_kernels._common import class_order, compute_dtype, l2_iterate_eps
from lpa_kernels.pgd import split


def split_block(K: int, D: int, device: torch.device) -> int | None:
    """``split.split_block`` for this device: 2 blocks per multiprocessor."""
    return split.split_block(K, D, 2 * cuda._multiprocessors(device))


def pgd_step(delta, grad, step, eps, direction, norm, ok=None, skipped=None, rounded=None):
    """``PGDLaunchers.pgd_step``; with ``ok`` and ``skipped`` the guarded step, in the same launches; with
    ``rounded``, the new delta also into it (written by the update itself when ``rounded`` is in the
    gradient's dtype and the grid has one block per class, else copied after)."""
    K, D = delta.shape
    if delta.numel() == 0:
        return
    acc = compute_dtype(delta.dtype, grad.dtype)  # float64 when either is (pgd_step_'s rule)
    # The kernel computes in delta's accumulation dtype: a float64 gradient updates a float64 copy.
    kdelta = delta if compute_dtype(delta.dtype) == acc else cuda.as_dtype(delta, acc)
    tile = split_block(K, D, delta.device) or 0  # 0: one block per class
    # A float32 delta takes a 16-bit gradient as it is on one block per class (head_pgd_'s class space).
    sixteen_bit = kdelta.dtype == torch.float32 and grad.dtype in (torch.float16, torch.bfloat16) and not tile
    kgrad = grad.contiguous() if grad.dtype in (kdelta.dtype, acc) or sixteen_bit else cuda.as_dtype(grad, acc)
    in_kernel = rounded is not None and kdelta is delta and not tile and rounded.dtype == kgrad.dtype \
        and rounded.is_contiguous()
    step, eps, direction = (cuda.as_dtype(v, acc) for v in (step, eps, direction))
    eps = l2_iterate_eps(eps, delta.dtype, kdelta.dtype, norm)  # the kernel's margin is kdelta's
    # The split grid's per-(class, tile) partials, for l2 and the guard (unguarded linf needs none).
    stats = torch.empty((split.N_STATS, K, -(-D // tile)), dtype=acc, device=delta.device) \
        if tile and (norm == "l2" or ok is not None) else None
    cuda.launch("pgd_step", delta.device, kdelta.data_ptr(), kgrad.data_ptr(), step.data_ptr(), eps.data_ptr(),
                direction.data_ptr(), K, D, cuda.NORM_CODES[norm], cuda.code(kdelta.dtype), cuda.code(kgrad.dtype),
                cuda.ptr(ok), cuda.ptr(skipped), tile, cuda.ptr(stats), cuda.ptr(rounded if in_kernel else None))
    if kdelta is not delta:
        delta.copy_(kdelta)
    if rounded is not None and not in_kernel:
        rounded.copy_(delta)


def class_grad_pgd_step(delta, grad_out, labels, h, step, eps, direction, inner, mode, norm, plan=None):
    """``PGDLaunchers.class_grad_pgd_step``: prepared and launched once."""
    prepare_class_grad_pgd_step(delta, grad_out, labels, h, inner, mode, norm, plan)(step, eps, direction)


def prepare_class_grad_pgd_step(delta, grad_out, labels, h, inner, mode, norm, plan=None):
    """``PGDLaunchers.prepare_class_grad_pgd_step``: the class order, grid, workspace and zeroed arrival
    counters, once; the returned ``launch(step, eps, direction)`` is the kernel alone (the block that
    completes a counter sets it back to zero, ``csrc/pgd.cu``), plus dtype copies where the dtypes need
    them (none in ``head_pgd_``'s rows form)."""
    K, D = delta.shape
    F = grad_out.shape[1]
    if delta.numel() == 0:
        return lambda step, eps, direction: None
    scale = mode == "scale"
    kdtype = torch.promote_types(grad_out.dtype, h.dtype) if scale else grad_out.dtype
    acc = compute_dtype(kdtype)
    kh = cuda.as_dtype(h, kdtype) if scale else None
    # Blocks over (group tile, class, sample split).
    splits = cuda.reduce_splits(delta.device, K, D, inner, grad_out.shape[0], kdtype.itemsize)
    max_tiles = _max_group_tiles(D, inner)
    workspace, arrivals = class_grad_workspace(K, D, splits, max_tiles, acc, delta.device)
    order, offsets = class_order(labels, K, plan)

    def launch(step, eps, direction):
        kgrad_out = cuda.as_dtype(grad_out, kdtype)  # (its values change between launches)
        # The kernel updates delta in grad_out's dtype or in the accumulation dtype; other dtypes go
        # through an accumulation-dtype copy, written back (rounded once).
        kdelta = delta if delta.dtype in (kdtype, acc) else cuda.as_dtype(delta, acc)
        step, eps, direction = (cuda.as_dtype(v, acc) for v in (step, eps, direction))
        eps = l2_iterate_eps(eps, delta.dtype, kdelta.dtype, norm)  # the kernel's margin is kdelta's
        cuda.launch("class_grad_pgd_step", delta.device, kdelta.data_ptr(), kgrad_out.data_ptr(), cuda.ptr(kh),
                    order.data_ptr(), offsets.data_ptr(), step.data_ptr(), eps.data_ptr(), direction.data_ptr(), K,
                    F, D, inner, cuda.MODE_CODES[mode], cuda.NORM_CODES[norm], cuda.code(kdtype),
                    cuda.code(kdelta.dtype), splits, max_tiles, workspace.data_ptr(), arrivals.data_ptr())
        if kdelta is not delta:
            delta.copy_(kdelta)

    return launch


def _max_group_tiles(D: int, inner: int) -> int:
    """An upper bound on the group tiles of the class reduction's grid (``reduce_block`` in
    ``csrc/class_reduce.cuh``): a tile holds at least min(32, D) groups when ``inner == 1``, one otherwise."""
    return D if inner > 1 else -(-D // min(32, D))


def class_grad_workspace(K: int, D: int, splits: int, max_tiles: int, acc: torch.dtype, device: torch.device):
    """``(workspace, arrivals)`` of the fused kernel: the per-split partial sums ``(splits, K, D)``, then
    the class gradient ``(K, D)``, then the per-tile partials of the update ``(split.N_STATS, K,
    max_tiles)``, flat, in ``acc``; arrival counts (zero) per class and per (class, tile), which each
    launch leaves at zero again."""
    workspace = torch.empty((splits + 1) * K * D + split.N_STATS * K * max_tiles, dtype=acc, device=device)
    return workspace, torch.zeros(K * (1 + max_tiles), dtype=torch.int32, device=device)
