"""Argument validation shared by every public op.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong dtype) naming the argument and what was
expected, before any kernel runs, so a rejected call changes nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
MODES = ("add", "scale")
NORMS = ("linf", "l2")
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
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

    The range check reads the labels on the host (a device sync on a GPU). ``values=False`` leaves it
    out: only for callers that range-checked this very tensor already (the LPA training machinery
    checks each batch's labels once per step, then calls the ops through their internal entry points).
    """
    labels = check_tensor(name, labels)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor of class indices, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one label per sample), got {tuple(labels.shape)}")
    if values and labels.numel() and not _compiling():
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), got values in [{lo}, {hi}]")
    return labels


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


def check_per_class(name: str, value: object, num_classes: int, positive: bool, nonnegative: bool = False):
    """A Python number or a ``(K,)`` tensor; ``positive`` demands > 0, ``nonnegative`` >= 0."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a ({num_classes},) tensor, got a bool")
    if isinstance(value, (int, float)):
        bad = (positive and not value > 0) or (nonnegative and not value >= 0)
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a float ({num_classes},) tensor, got dtype {value.dtype}")
        if value.shape != (num_classes,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({num_classes},), got {tuple(value.shape)}")
        bad = bool((positive and not (value > 0).all()) or (nonnegative and not (value >= 0).all()))
    else:
        raise TypeError(f"{name} must be a float or a ({num_classes},) tensor, got {type(value).__name__}")
    if bad:
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {rule} for every class, got {value}")
    return value


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
