"""Small helpers shared by the ops and both backends: precision rules, delta layouts, output allocation,
class order, in-place updates. Pure PyTorch (no Triton, no extension)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.autograd.forward_ad as forward_ad


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Arithmetic runs in float32, or float64 when any input is float64 (half inputs are upcast)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def under_transform() -> bool:
    """Whether forward-mode AD or a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is active.
    The custom ops have no forward-mode or batching rules (PyTorch would drop the tangent) and the host
    kernels see no tangents or batch dimensions, so the ops run their PyTorch definition there."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def transform_unwrapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrappers of the ``torch.func`` transforms around it: under ``vmap`` a tensor whose
    values are all of the batch's (``t`` itself when not wrapped), for a host read of values such as the
    labels' range check (a wrapped tensor has no storage of its own)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def padded_delta_shape(delta_shape: Sequence[int], feature_shape: Sequence[int]) -> tuple[int, ...]:
    """``(K, *P)`` with ``P`` left-padded by ones to the rank of ``F``, so ``delta[labels]`` broadcasts."""
    per_class = tuple(delta_shape[1:])
    return (delta_shape[0],) + (1,) * (len(feature_shape) - len(per_class)) + per_class


def delta_layout(feature_shape: Sequence[int], delta_shape: Sequence[int]) -> tuple[int, int] | None:
    """``(D, I)`` such that feature ``f`` of a flattened sample reads ``delta[y, (f // I) % D]``.

    This covers the three layouts the kernels serve: full (``D = F``, ``I = 1``), channel-wise NCHW
    (``D = C``, ``I = H * W``) and last-dim (``D`` = last size, ``I = 1``). It returns None when the
    dimensions that vary in ``P`` are not one contiguous run of ``F``; callers then expand delta.
    """
    padded = padded_delta_shape(delta_shape, feature_shape)[1:]
    varying = [i for i, (p, f) in enumerate(zip(padded, feature_shape)) if p == f and f != 1]
    if not varying:
        return 1, 1
    first, last = varying[0], varying[-1]
    if any(feature_shape[i] != 1 and i not in varying for i in range(first, last + 1)):
        return None
    return math.prod(feature_shape[first : last + 1]), math.prod(feature_shape[last + 1 :])


def flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t (N, *S)`` viewed as ``(N, prod(S))`` (also when N == 0, where ``reshape(N, -1)`` fails)."""
    return None if t is None else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def label_plan(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class order of one batch's labels, built once (one sort) and shared by every kernel call on
    those labels (the steps of a PGD loop, the ops of a training step): ``class_order``'s ``(order,
    starts)`` and ``class_segments``' ``(segment_class, segment_start)``, packed into one int64 tensor
    of ``B + (K + 1) + S + (S + 1)`` entries (``S = min(B, K)``) so a custom op can take it as one
    argument. Device-side, no host read. ``unpack_label_plan`` gives the four parts back (views)."""
    order, segment_class, segment_start, sorted_labels = _sorted_segments(labels, num_classes)
    starts = torch.searchsorted(sorted_labels, torch.arange(num_classes + 1, device=labels.device))
    return torch.cat([order, starts, segment_class, segment_start])


def unpack_label_plan(plan: torch.Tensor, batch: int, num_classes: int):
    """``(order (B,), starts (K + 1,), segment_class (S,), segment_start (S + 1,))`` of a ``label_plan``."""
    segments = min(batch, num_classes)
    return torch.split(plan, [batch, num_classes + 1, segments, segments + 1])


def class_order(labels: torch.Tensor, num_classes: int, plan: torch.Tensor | None = None):
    """``(order, starts)`` int64: sample indices sorted by class (stable, hence a fixed order) and
    ``starts (K + 1,)`` with class c's samples at ``order[starts[c]:starts[c + 1]]``; from ``plan``
    (a ``label_plan`` of these labels) when given."""
    if plan is not None:
        return unpack_label_plan(plan, labels.numel(), num_classes)[:2]
    order = torch.argsort(labels, stable=True)
    # A binary search of the sorted labels, not a cumsum of bincount: bincount's output size depends on
    # the labels, so on a GPU it reads their min and max back to the host (a sync per call).
    classes = torch.arange(num_classes + 1, dtype=labels.dtype, device=labels.device)
    return order, torch.searchsorted(labels[order], classes)


def class_segments(labels: torch.Tensor, num_classes: int, plan: torch.Tensor | None = None):
    """``(order, segment_class, segment_start)``: sample indices sorted by class (stable), and the
    ``S = min(B, K)`` segments of that order, one per class present: segment s holds the samples
    ``order[segment_start[s]:segment_start[s + 1]]``, all of class ``segment_class[s]``. Segments past
    the classes present are padding: class ``K`` (no class) and no samples. ``S`` is known on the host,
    so the grids built on it need no device-to-host read; everything here stays on the device. From
    ``plan`` (a ``label_plan`` of these labels) when given."""
    if plan is not None:
        order, _, segment_class, segment_start = unpack_label_plan(plan, labels.numel(), num_classes)
        return order, segment_class, segment_start
    return _sorted_segments(labels, num_classes)[:3]


def _sorted_segments(labels: torch.Tensor, num_classes: int):
    """``class_segments`` plus the sorted labels (int64)."""
    B = labels.numel()
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order].to(torch.int64)
    first = torch.ones(B, dtype=torch.bool, device=labels.device)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    segment = torch.cumsum(first, 0) - 1  # the segment of each sorted sample, non-decreasing
    segments = min(B, num_classes)
    # Gathers and a binary search rather than scatters: deterministic, and allowed under
    # torch.use_deterministic_algorithms on every device.
    segment_start = torch.searchsorted(segment, torch.arange(segments + 1, device=labels.device))
    first_labels = sorted_labels[segment_start[:-1].clamp_max(B - 1)]
    segment_class = torch.where(segment_start[:-1] < B, first_labels, num_classes)
    return order, segment_class, segment_start, sorted_labels


def update_in_place(delta: torch.Tensor, run) -> torch.Tensor:
    """Run ``run(contiguous_delta)`` under no_grad and make sure ``delta`` itself holds the result."""
    with torch.no_grad():
        target = delta if delta.is_contiguous() else delta.contiguous()
        run(target)
        if target is not delta:
            delta.copy_(target)
    return delta


def poisoning() -> bool:
    """Tests set ``LPA_POISON=1`` so that every kernel output starts as NaN and unwritten cells show."""
    return os.environ.get("LPA_POISON", "0") == "1"


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer a kernel fully overwrites (NaN-filled when poisoning)."""
    if poisoning():
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def per_class(value: float | torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """A validated step size / radius / direction as a contiguous ``(K,)`` tensor in ``like``'s compute dtype."""
    dtype = compute_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=dtype).contiguous()
    return torch.full((num_classes,), float(value), dtype=dtype, device=like.device)


# The L2 projection targets ``eps - eps * margin``, not eps itself: the norm it divides by is rounded (a
# few ulps, growing slowly with D), and so is the projected row when it is stored; a row scaled onto
# exactly eps can land one ulp outside the ball. The margin (32 float32 ulps, 256 float64 ulps) is that of
# the dtype delta is stored in (its compute dtype: float64 only for a float64 delta), which absorbs both
# roundings, so a projected float32/float64 row never exceeds eps, also when it was computed in float64 (a
# float64 gradient); the radius moves by ~2e-6 (float32). Powers of two, so a Triton kernel receives them
# exactly as a float32 scalar argument.
L2_RADIUS_MARGIN = {torch.float32: 2.0**-19, torch.float64: 2.0**-45}


def l2_radius_margin(delta_dtype: torch.dtype) -> float:
    """The relative margin inside eps that the L2 projection of ``pgd_step_`` targets for a delta stored in
    ``delta_dtype`` (whatever dtype the step computes in)."""
    return L2_RADIUS_MARGIN[compute_dtype(delta_dtype)]


def l2_iterate_eps(eps: torch.Tensor, delta_dtype: torch.dtype, iterate_dtype: torch.dtype, norm: str) -> torch.Tensor:
    """The radii ``(K,)`` for the L2 steps of an iterate kept in ``iterate_dtype`` and rounded into a delta of
    ``delta_dtype`` once after them (``head_pgd_`` on a float32 delta with float64 ``h``): ``eps`` shrunk by
    delta's margin where it is wider than the iterate's, which the steps' own projections use, so that the
    final rounding leaves no class above eps either; ``eps`` itself otherwise."""
    if norm != "l2" or l2_radius_margin(delta_dtype) <= l2_radius_margin(iterate_dtype):
        return eps
    return eps - eps * l2_radius_margin(delta_dtype)

