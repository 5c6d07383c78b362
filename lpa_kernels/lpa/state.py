"""The learned state of a training method as state-dict entries, so checkpoints keep it.

``method.state_dict()`` and the ``lpa_state.`` entries of ``method.as_module().state_dict()`` hold, as
tensors (``K`` classes, ``P`` the per-class perturbation shape)::

    counters.lower_forwards, counters.upper_forwards,
    counters.training_steps, counters.pgd_steps        () int64   Method.stats()'s call counts
    lpa.delta                                          (K, *P)    LPA's per-class perturbation
    lpa.skipped_updates                                () int64   class updates the finiteness guard skipped
    lpa.loss_ema, lpa.fall_ema                         (K,) f64   the "loss_trend" policy's running state
    lpa.skipped_statistics                             () int64   class statistics that policy left out
    lpl.delta, lpl.skipped_updates, lpl.loss_ema, ...  (K, K)...  the same for LPL's logit offset

Delta is created at the first training batch (its shape ``P`` comes from the layer's activations) and
the "loss_trend" state at the first observed batch, so before then those entries are absent, and
loading creates them. That is why these entries are written and read by this module's state-dict hooks
(``_save_to_state_dict`` / ``_load_from_state_dict``, the extension points torch's own modules use)
rather than held as registered buffers: a buffer cannot exist before its shape is known, and the
counters are the method's plain integers. Each entry is also an attribute along its key
(``as_module().lpa_state.lpa.delta``), as tools that map keys to tensors through attributes expect.

Loading is strict: every key is checked (unknown, missing, shape or dtype kind) before any state
changes, and a mismatch raises ``ValueError`` naming the key and the shape expected (``K`` and the
layer's per-class shape). Loaded tensors go to the device of the state they replace (the model's
device when delta does not exist yet).
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "lpa_state."  # where ``method.as_module()`` keeps these entries
SITES = ("lpa", "lpl")
COUNTERS = ("lower_forwards", "upper_forwards", "training_steps", "pgd_steps")
_TREND = ("loss_ema", "fall_ema")


def _sites(method) -> dict:
    """``{"lpa": site, "lpl": site}`` for the perturbations ``method`` has (none for the baselines)."""
    return {name: getattr(method, name) for name in SITES if getattr(method, name, None) is not None}


def state_tensors(method) -> dict[str, torch.Tensor]:
    """The method's state entries that exist now (see the module docstring), live tensors (not copies)."""
    state = {f"counters.{name}": torch.tensor(method._counts[name], dtype=torch.int64) for name in COUNTERS}
    for name, site in _sites(method).items():
        if site.delta is not None:
            state[f"{name}.delta"] = site.delta
            state[f"{name}.skipped_updates"] = site._skipped
        policy = site.policy
        if policy.tracks_loss and policy.loss_ema is not None:
            state[f"{name}.loss_ema"], state[f"{name}.fall_ema"] = policy.loss_ema, policy.fall_ema
            state[f"{name}.skipped_statistics"] = policy._skipped
    return state


def _expected(method) -> dict[str, tuple[tuple, str]]:
    """Every key the method accepts: ``(shape, what)``; a shape holding None where the per-class shape is
    not known yet: before the first batch, which checks a delta loaded before it (so another load may
    replace one that batch refused)."""
    k = method.num_classes
    expected = {f"counters.{name}": ((), "a count") for name in COUNTERS}
    for name, site in _sites(method).items():
        if site.delta is None or site._loaded_unchecked:
            expected[f"{name}.delta"] = ((k, None), f"K={k} classes x the per-class shape")
        else:
            per_class = tuple(site.delta.shape[1:])
            expected[f"{name}.delta"] = ((k, *per_class), f"K={k} classes x the per-class shape {per_class}")
        expected[f"{name}.skipped_updates"] = ((), "a count")
        if site.policy.tracks_loss:
            for trend in _TREND:
                expected[f"{name}.{trend}"] = ((k,), f"one value per class, K={k}")
            expected[f"{name}.skipped_statistics"] = ((), "a count")
    return expected


def check_state(method, state: dict, strict: bool = True, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first key of ``state`` the method cannot take (unknown, wrong
    shape or kind of dtype), or, with ``strict``, a key it holds now that ``state`` lacks. ``prefix``:
    where these keys sit in the caller's state dict, for the messages."""
    expected = _expected(method)
    for name, value in state.items():
        key = prefix + name
        if name not in expected:
            raise ValueError(f"unexpected key {key!r} in the state of method {method.name!r} "
                             f"(it takes {', '.join(sorted(expected))})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key!r} must be a torch.Tensor, got {type(value).__name__}")
        shape, what = expected[name]
        matches = len(shape) == value.dim() or (None in shape and value.dim() >= 1)
        matches = matches and all(s is None or s == v for s, v in zip(shape, value.shape))
        if not matches:
            shown = "(" + ", ".join("..." if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {shown} ({what})")
        count = what == "a count"
        if value.is_floating_point() == count or value.is_complex():
            raise ValueError(f"{key!r} has dtype {value.dtype}, expected {'an integer' if count else 'a floating-point'} dtype")
    for name in _sites(method):  # the policy's running state is one thing: both halves or neither
        trend = [f"{name}.{t}" for t in _TREND]
        if sum(key in state for key in trend) == 1:
            absent = next(key for key in trend if key not in state)
            raise ValueError(f"missing key {prefix + absent!r} in the state of method {method.name!r}: "
                             f"the 'loss_trend' state is {' and '.join(map(repr, trend))} together")
    if strict:
        missing = [prefix + name for name in state_tensors(method) if name not in state]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(map(repr, missing))} in the state of method {method.name!r}")


def check_module_state(method, state_dict: dict, strict: bool = True) -> None:
    """``check_state`` for the state dict of ``method.as_module()``: the method's entries under
    ``lpa_state.``, the model's under ``model.`` (unknown keys, shapes, and with ``strict`` missing keys)."""
    unknown = [k for k in state_dict if not k.startswith(("model.", PREFIX))]
    if unknown:
        raise ValueError(f"unexpected key(s) {', '.join(map(repr, unknown[:10]))}: keys start with 'model.' or {PREFIX!r}")
    check_state(method, {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}, strict, PREFIX)
    weights = {k: v.shape for k, v in method.model.state_dict(prefix="model.").items()}
    for key, value in state_dict.items():
        if key.startswith("model.") and key not in weights:
            raise ValueError(f"unexpected key {key!r}: the model has no such parameter or buffer")
        if key in weights and isinstance(value, torch.Tensor) and value.shape != weights[key]:
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(weights[key])}")
    missing = [k for k in weights if k not in state_dict]
    if strict and missing:
        raise ValueError(f"missing key(s) {', '.join(map(repr, missing[:10]))} for the model")


def load_state(method, state: dict, strict: bool = True) -> None:
    """Check ``state`` (``check_state``), then take it over."""
    check_state(method, state, strict)
    for name in COUNTERS:
        if f"counters.{name}" in state:
            method._counts[name] = int(state[f"counters.{name}"])
    for name, site in _sites(method).items():
        device = site.delta.device if site.delta is not None else _model_device(method)
        with torch.no_grad():
            if f"{name}.delta" in state:
                site.load(state[f"{name}.delta"].detach().to(device))
            if f"{name}.skipped_updates" in state:
                site._skipped = state[f"{name}.skipped_updates"].detach().to(device, torch.int64).clone()
            policy = site.policy
            if f"{name}.loss_ema" in state:
                policy.loss_ema, policy.fall_ema = (state[f"{name}.{t}"].detach().to(device, torch.float64).clone()
                                                    for t in _TREND)
                skipped = state.get(f"{name}.skipped_statistics", torch.zeros((), dtype=torch.int64))
                policy._skipped = skipped.detach().to(device, torch.int64).clone()


def _model_device(method) -> torch.device:
    parameter = next(method.model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


class _Group(nn.Module):
    """The entries ``<group>.<name>`` as attributes (``lpa_state.lpa.delta``), so that tools which walk a
    state-dict key through attributes (``torch.distributed.checkpoint.state_dict``) find them. It holds
    nothing itself: ``MethodState`` writes and reads every entry."""

    def __init__(self, method, group: str):
        super().__init__()
        self._method, self._group = method, group

    def __getattr__(self, name: str):
        if not name.startswith("_"):
            value = state_tensors(self._method).get(f"{self._group}.{name}")
            if value is not None:
                return value
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, *args, **kwargs):
        pass


class MethodState(nn.Module):
    """The method's state as entries of an enclosing module's state dict (see the module docstring)."""

    def __init__(self, method):
        super().__init__()
        self._method = method  # not a module: stays out of children(), so the model is not listed twice
        for group in ("counters",) + tuple(_sites(method)):
            self.add_module(group, _Group(method, group))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in state_tensors(self._method).items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch passes strict=True here whatever the caller asked and decides from missing_keys at the end,
        # after every module has loaded: so unknown keys and shapes raise now (before this state and the
        # model, registered after it, change) and missing keys are reported to torch.
        # ``_TrainingLoss.load_state_dict`` checks everything, missing keys too, before this runs.
        mine = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        check_state(self._method, mine, strict=False, prefix=prefix)
        missing_keys.extend(prefix + key for key in state_tensors(self._method) if key not in mine)
        load_state(self._method, mine, strict=False)
