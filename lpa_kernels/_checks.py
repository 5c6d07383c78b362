"""Argument validation shared by every public op.

Each check raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong shape, device,
value or choice, naming the argument and what was expected, before any kernel runs, so a rejected call
changes nothing.

Mixed dtypes (a documented cast, not an error; ``tests/test_dtype_rules.py``): ``delta`` may have any of
the four float dtypes whatever dtype ``h``/``x`` has, and ``pgd_step_``'s ``grad`` any of them whatever
``delta`` has. The ops compute in float32 (float64 when the activations, or for ``perturb`` and the PGD
steps any operand, are float64); each result comes back in the dtype of what it stands for: ``h~`` and
``out`` in the activations' dtype, ``grad_delta`` and the updated ``delta`` in delta's dtype. The fused
head (``head_pgd_``) rounds the perturbed activations to ``h``'s dtype, as ``perturb`` + ``F.linear`` would.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

from lpa_kernels import _host_ext
from lpa_kernels._common import compute_dtype, per_class, transform_unwrapped

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
MODES = ("add", "scale")
NORMS = ("linf", "l2")
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# ``direction`` is a per-class multiplier of the step: the sign chooses ascent (+) or descent (-) of the
# class's loss, the magnitude scales the step (the confidence policy's |thr - p_c| / max), never beyond it.
DIRECTION_BOUNDS = (-1.0, 1.0)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        error = ValueError if isinstance(value, str) else TypeError
        raise error(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_count(name: str, value: object, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``: ``TypeError`` for another type, ``ValueError`` below it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, t: object) -> torch.Tensor:
    t = check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    # Non-tensors are left to the argument's own check (which raises a TypeError naming it).
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {k: v.device for k, v in present.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    return first


def check_labels(labels: object, batch: int, num_classes: int, name: str = "labels", values: bool = True) -> torch.Tensor:
    """``labels`` must be a 1-D int32/int64 tensor of length ``batch`` with values in ``[0, num_classes)``.

    The range check reads the labels on the host (a device sync on a GPU); inside a ``torch.compile``d
    graph, which cannot read values, it is an in-graph assertion instead (``torch._assert_async``: a
    ``RuntimeError`` naming the labels on the CPU, a device-side assert on a GPU). Meta tensors have no
    values to check. ``values=False`` leaves it out: only for callers that range-checked this very tensor
    already (the LPA training machinery checks each batch's labels once per step, on the device, then
    calls the ops through their internal entry points).
    """
    labels = check_tensor(name, labels)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor of class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one label per sample), got {tuple(labels.shape)}")
    if not values or labels.numel() == 0 or labels.device.type == "meta":
        return labels
    if _compiling():
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{name} must lie in [0, {num_classes}) (num_classes={num_classes})")
    else:
        values = transform_unwrapped(labels)  # under vmap: every batch's labels
        lo_hi = _host_ext.label_range(values)  # CPU labels: one C++ pass, no PyTorch dispatch
        lo, hi = torch.stack(torch.aminmax(values)).tolist() if lo_hi is None else lo_hi  # one host read
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), got values in [{lo}, {hi}]")
    return labels


def check_shape(name: str, value: object) -> tuple[int, ...]:
    """A shape: a tuple, list or ``torch.Size`` of ints >= 0 (not bools), returned as a tuple."""
    if not isinstance(value, (tuple, list, torch.Size)) or any(isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise TypeError(f"{name} must be a tuple of ints (a shape), got {value!r}")
    if any(s < 0 for s in value):
        raise ValueError(f"{name} must not have negative sizes, got {tuple(value)}")
    return tuple(value)


def check_delta_shape(delta_shape: Sequence[int], feature_shape: Sequence[int], name: str = "delta") -> None:
    """``delta (K, *P)`` must broadcast to one sample's features ``F`` without growing them."""
    delta_shape, feature_shape = tuple(delta_shape), tuple(feature_shape)
    if len(delta_shape) < 1 or delta_shape[0] < 1:
        raise ValueError(f"{name} must have shape (K, *P) with K >= 1, got {delta_shape}")
    per_class = delta_shape[1:]
    ok = len(per_class) <= len(feature_shape) and all(
        p in (1, f) for p, f in zip(reversed(per_class), reversed(feature_shape))
    )
    if not ok:
        raise ValueError(
            f"{name} must have shape (K, *P) with P broadcastable to the feature shape {feature_shape} "
            f"(full, channel-wise (C, 1, 1) or last-dim (1, .., D)), got {delta_shape}"
        )


def check_per_class_values(specs: Sequence[tuple], num_classes: int, device: torch.device | None = None,
                           dtype: torch.dtype = torch.float64) -> list:
    """Each ``(name, value, positive, nonnegative, bounds)`` of ``specs``: ``value`` must be a finite Python
    number or a finite ``(K,)`` float tensor (on ``device``, when given); ``positive`` demands > 0,
    ``nonnegative`` >= 0, ``bounds=(lo, hi)`` lo <= value <= hi, all as rounded to ``dtype``, the dtype the
    op computes in (1e39 is not a finite float32, 1e-300 not a positive one). NaN and +-Inf are always
    refused: one such hyperparameter would write NaN or Inf into delta. Types, shapes and devices are
    checked first, in order; then the values, those of all the tensors read on the host at once (one device
    sync, as the public ops validate before any kernel runs; no read when all are numbers; inside a
    ``torch.compile``d graph an in-graph assertion, as :func:`check_labels`). Returns the values."""
    pending = []  # (name, value, rules, one 0-d bool tensor per rule)
    for name, value, positive, nonnegative, bounds in specs:
        values = _per_class_tensor(name, value, num_classes, device)
        rules = _value_rules(positive, nonnegative, bounds)
        if values is None:  # a Python number
            rounded = _rounded(float(value), dtype)
            _raise_unless_held(name, value if rounded == value else f"{value} ({rounded} in {dtype})", rules,
                               [bool(holds(rounded)) for _, holds in rules])
        elif values.device.type == "meta":  # no values to check
            continue
        elif _compiling():
            values = values.to(dtype)
            for text, holds in rules:
                torch._assert_async(holds(values).all(), f"{name} must be {text} for every class")
        else:
            values = values.to(dtype)
            pending.append((name, value, rules, [holds(values).all() for _, holds in rules]))
    if pending:
        held = iter(torch.stack([ok for *_, oks in pending for ok in oks]).cpu().tolist())  # the one host read
        for name, value, rules, oks in pending:
            _raise_unless_held(name, value, rules, [next(held) for _ in oks])
    return [spec[1] for spec in specs]


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` as ``dtype`` (float32 or float64) holds it: beyond float32's range an infinity."""
    if dtype != torch.float32:
        return value
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _per_class_tensor(name: str, value: object, num_classes: int, device: torch.device | None) -> torch.Tensor | None:
    """The detached values of a per-class tensor ``value`` (type, shape and device checked), or None for
    a Python number."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a ({num_classes},) tensor, got a bool")
    if isinstance(value, (int, float)):
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a ({num_classes},) tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float or a float ({num_classes},) tensor, got dtype {value.dtype}")
    if value.shape != (num_classes,):
        raise ValueError(f"{name} must be a float or a tensor of shape ({num_classes},), got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on delta's device {device}, got a tensor on {value.device}")
    return value.detach()


def _value_rules(positive: bool, nonnegative: bool, bounds: tuple[float, float] | None) -> list:
    """``[(text, holds)]``: each ``holds`` maps a float or a tensor to whether (elementwise) the rule holds."""
    rules = []
    if positive:
        rules.append(("> 0", lambda v: v > 0))
    if nonnegative:
        rules.append((">= 0", lambda v: v >= 0))
    if bounds is not None:
        lo, hi = bounds
        rules.append((f"in [{lo}, {hi}]", lambda v: (v >= lo) & (v <= hi)))
    rules.append(("finite", lambda v: torch.isfinite(v) if isinstance(v, torch.Tensor) else math.isfinite(v)))
    return rules


def _raise_unless_held(name: str, value: object, rules: list, held: list[bool]) -> None:
    failed = [text for (text, _), ok in zip(rules, held) if not ok]
    if failed:
        raise ValueError(f"{name} must be {' and '.join(text for text, _ in rules)} for every class "
                         f"({failed[0]} fails), got {value}")


def _memory_span(t: torch.Tensor) -> tuple[torch.device, int, int] | None:
    """``(device, first byte, end byte)`` of the memory ``t`` reads or writes, or None when it has none
    (empty, on the meta device, or a tensor without storage such as torch.compile's fake tensors, which
    Dynamo traces without a data pointer: the check then happens at no point, as the value checks)."""
    if t.numel() == 0 or t.device.type == "meta" or _compiling():
        return None
    try:
        start = t.data_ptr()
    except RuntimeError:  # fake / functorch-wrapped tensors have no data pointer: nothing to alias
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return t.device, start, start + extent * t.element_size()


def check_in_place_target(delta: torch.Tensor, **others: torch.Tensor | float | None) -> None:
    """An in-place op may write ``delta``: it must not share memory with any other argument (the kernel
    would read what it has already overwritten, or overwrite the caller's weights), and it must not be
    a tensor autograd tracks (updating it in grad mode would corrupt a pending backward; call the op
    under ``torch.no_grad()``, as optimizers update parameters), nor one PyTorch would refuse to update in
    place (:func:`_check_writable`). Non-tensors in ``others`` are skipped.

    Memory is compared by address range (the span from the first to the last element), so two
    interleaved views of one buffer count as overlapping even when they share no element.
    """
    if delta.requires_grad and torch.is_grad_enabled():
        raise ValueError("delta requires grad: an in-place PGD update of a tensor autograd tracks is refused "
                         "in grad mode; call the op under torch.no_grad() (or pass delta.detach())")
    if not _compiling():  # Dynamo cannot trace is_inference()
        _check_writable(delta)
    span = _memory_span(delta)
    if span is None:
        return
    for name, other in others.items():
        other_span = _memory_span(other) if isinstance(other, torch.Tensor) else None
        if other_span is not None and other_span[0] == span[0] and other_span[1] < span[2] and span[1] < other_span[2]:
            raise ValueError(f"delta and {name} share memory: the op updates delta in place, so {name} "
                             f"must not alias or overlap it (pass a clone)")


def _check_writable(delta: torch.Tensor) -> None:
    """What PyTorch's own in-place ops refuse, refused before the kernels (which write through delta's
    address, so PyTorch would not see it): an inference tensor outside inference mode, and a delta with
    elements sharing memory (an expanded view)."""
    if delta.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("delta is an inference tensor: PyTorch updates those in place only inside "
                         "torch.inference_mode(); call the op there, or pass a tensor made outside it (delta.clone())")
    if torch._debug_has_internal_overlap(delta) == 1:
        raise ValueError("delta has elements that share memory (an expanded or overlapping view): the op writes "
                         "every element of delta, so pass a tensor with one element per location (delta.contiguous())")


def check_grad_out(grad_out: object, h: object, mode: object, delta_shape: Sequence[int], delta_name: str = "delta") -> None:
    """The class-gradient inputs: ``grad_out (B, *F)`` float with ``delta_shape`` broadcastable to ``F``,
    a known ``mode``, and ``h`` of ``grad_out``'s shape (required for ``scale``, whose gradient is ``grad_out * h``)."""
    check_float("grad_out", grad_out)
    check_choice("mode", mode, MODES)
    if grad_out.dim() < 1:
        raise ValueError("grad_out must have shape (B, *F), got a 0-d tensor")
    check_delta_shape(delta_shape, grad_out.shape[1:], name=delta_name)
    if mode == "scale" and h is None:
        raise ValueError("h is required for mode='scale' (the gradient w.r.t. delta is grad_out * h)")
    if h is not None:
        check_float("h", h)
        if h.shape != grad_out.shape:
            raise ValueError(f"h must have the shape of grad_out {tuple(grad_out.shape)}, got {tuple(h.shape)}")


def check_pgd_hyperparameters(delta: object, step_size: object, eps: object, direction: object, norm: object):
    """Validate delta and the PGD hyperparameters (finite; step_size >= 0, eps > 0, direction in [-1, 1];
    tensors on delta's device; at most one host read for the three); returns ``[step, radius, sign]`` as
    ``(K,)`` tensors in delta's compute dtype."""
    check_float("delta", delta)
    if delta.dim() < 1 or delta.shape[0] < 1:
        raise ValueError(f"delta must have shape (K, *P) with K >= 1, got {tuple(delta.shape)}")
    check_choice("norm", norm, NORMS)
    k = delta.shape[0]
    checked = check_per_class_values([("step_size", step_size, False, True, None), ("eps", eps, True, False, None),
                                      ("direction", direction, False, False, DIRECTION_BOUNDS)], k, delta.device,
                                     compute_dtype(delta.dtype))
    return [per_class(v, k, delta) for v in checked]
