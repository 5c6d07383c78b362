"""``LPAConfig``: every setting of the LPA controller and the baselines, with validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from lpa_kernels import _checks
from lpa_kernels.backend import BACKENDS
from lpa_kernels.lpa.policies import DIRECTIONS, RADII
from lpa_kernels.lpa.registry import METHODS

INITS = ("fresh", "carried")
DELTA_SHAPES = ("full", "channel", "last")
HEAD_PATHS = ("auto", "always", "never")
LOSSES = ("ce", "la")

# The default PGD step is this many times the largest radius over the T steps, so the radius binds:
# a fresh delta reaches the sphere within ceil(T / STEP_OVER_RADIUS) steps (Madry et al.'s 2.5 eps / T).
# Single pass (T = 0) moves the carried delta by a quarter of the radius per training step.
STEP_OVER_RADIUS = 2.5
SINGLE_PASS_STEP_FRACTION = 0.25


@dataclass
class LPAConfig:
    """Settings of LPA (SPEC section 1), LPL and the baselines.

    LPA: ``mode`` ("add" | "scale"), ``norm`` ("linf" | "l2"), radius ``eps``, PGD ``step_size`` (None:
    ``2.5 * eps_max / steps``, or ``eps_max / 4`` in single pass, with ``eps_max`` the largest radius the
    radius policy can give, so that the radius binds),
    ``steps`` (T >= 1: T PGD steps per batch on the upper network; 0: single pass, delta carried and
    updated once from the training backward), ``direction`` (a ``policies.DIRECTIONS`` name or a ``(K,)``
    tensor of signs), ``radius`` (a ``policies.RADII`` name) and the policies' settings: ``gamma``
    ("frequency" radius exponent), ``delta_eps`` ("confidence" radius bonus, a fraction of eps),
    ``head_classes`` / ``head_fraction`` (the head of the "split" direction and "budget" radius; None for
    both: LPL's split), ``head_budget`` / ``tail_budget`` ("budget" radius, LPL's step counts), ``init`` ("fresh": delta
    starts at 0 every batch | "carried"; None picks "carried" for ``steps == 0`` and "fresh" otherwise),
    ``delta_shape`` ("full" ``(K, *F)`` | "channel" ``(K, F[0], 1, ..)`` | "last" ``(K, 1, .., F[-1])``),
    ``head`` ("auto" | "always" | "never": the fused ``head_pgd_`` path when the layer feeds the final
    ``nn.Linear`` classifier directly), ``trend_momentum`` (EMA factor of the "loss_trend" policy).
    LPL: ``lpl_eps``, ``lpl_step_size``, ``lpl_steps`` (L2 PGD on a ``(K, K)`` logit offset; fresh when
    ``lpl_steps >= 1``, carried single pass when 0; ``lpl_step_size`` None: as for ``step_size``). Loss:
    ``loss`` ("ce" | "la": logit-adjusted cross-entropy, ``CE(f(x) + tau * log(prior), y)``, Menon et al.
    2021, with the prior from the training class counts), ``tau``. Baselines: ``noise_std``, ``dropout_p``,
    ``mixup_alpha``, ``adv_eps``. ``backend`` is passed to every op.
    """

    mode: str = "add"
    norm: str = "l2"
    eps: float = 1.0
    step_size: Optional[float] = None
    steps: int = 3
    direction: Union[str, torch.Tensor] = "confidence"
    radius: str = "constant"
    gamma: float = 1.0
    delta_eps: float = 0.075  # LPL balanced: 81..87 updates, the nearest class at 0.93 of the largest
    head_classes: Optional[int] = None
    head_fraction: Optional[float] = None
    head_budget: float = 10.0
    tail_budget: float = 50.0
    init: Optional[str] = None
    delta_shape: str = "full"
    head: str = "auto"
    trend_momentum: float = 0.9
    lpl_eps: float = 1.0
    lpl_step_size: Optional[float] = None
    lpl_steps: int = 5
    loss: str = "ce"
    tau: float = 1.0
    noise_std: float = 0.1
    dropout_p: float = 0.1
    mixup_alpha: float = 2.0
    adv_eps: float = 0.05
    backend: str = "auto"

    def __post_init__(self):
        _checks.check_choice("mode", self.mode, _checks.MODES)
        _checks.check_choice("norm", self.norm, _checks.NORMS)
        _checks.check_choice("backend", self.backend, ("auto",) + BACKENDS)
        if not isinstance(self.direction, torch.Tensor):
            _checks.check_choice("direction", self.direction, DIRECTIONS.names())
        elif self.direction.dim() != 1:
            raise ValueError(f"direction must be a policy name or a (K,) tensor, got shape {tuple(self.direction.shape)}")
        else:  # the user's per-class multipliers, as the ops check theirs (signs may come as ints)
            _checks.check_per_class_values([("direction", self.direction.detach().double(), False, False,
                                             _checks.DIRECTION_BOUNDS)], self.direction.shape[0])
        _checks.check_choice("radius", self.radius, RADII.names())
        _checks.check_choice("loss", self.loss, LOSSES)
        _checks.check_choice("delta_shape", self.delta_shape, DELTA_SHAPES)
        _checks.check_choice("head", self.head, HEAD_PATHS)
        for name in ("steps", "lpl_steps"):
            _checks.check_count(name, getattr(self, name), 0)
        for name in ("eps", "lpl_eps", "mixup_alpha"):
            _check_number(self, name, "> 0", lambda v: v > 0)
        for name in ("noise_std", "adv_eps", "gamma", "delta_eps", "tau"):
            _check_number(self, name, ">= 0", lambda v: v >= 0)
        for name in ("head_budget", "tail_budget"):
            _check_number(self, name, ">= 1", lambda v: v >= 1)
        if self.head_classes is not None and self.head_fraction is not None:
            raise ValueError("give head_classes or head_fraction, not both")
        if self.head_classes is not None:
            _checks.check_count("head_classes", self.head_classes, 0)
        if self.head_fraction is not None:
            _check_number(self, "head_fraction", "in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("step_size", "lpl_step_size"):
            if getattr(self, name) is not None:
                _check_number(self, name, ">= 0", lambda v: v >= 0)
        for name in ("dropout_p", "trend_momentum"):
            _check_number(self, name, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.init is None:
            self.init = "carried" if self.steps == 0 else "fresh"
        _checks.check_choice("init", self.init, INITS)
        if self.steps == 0 and self.head == "always":
            raise ValueError("head='always' needs steps >= 1 (it runs the T PGD steps in one head_pgd_ call); "
                             "single pass (steps=0) has no PGD loop to fuse")
        if self.steps == 0 and self.init != "carried":
            raise ValueError("steps=0 (single-pass mode) needs init='carried': delta is updated once per "
                             "training step and must be kept across batches")


    # The defaults are resolved when read, not stored, so dataclasses.replace(config, eps=...) keeps
    # the step tied to the new radius.
    @property
    def resolved_step_size(self) -> float:
        """LPA's step: ``step_size``, or when None the step that makes the radius bind."""
        return self._binding_step(self.eps, self.steps) if self.step_size is None else self.step_size

    @property
    def resolved_lpl_step_size(self) -> float:
        """LPL's step: ``lpl_step_size``, or when None the step that makes ``lpl_eps`` bind."""
        return self._binding_step(self.lpl_eps, self.lpl_steps) if self.lpl_step_size is None else self.lpl_step_size

    def _binding_step(self, eps: float, steps: int) -> float:
        """``STEP_OVER_RADIUS * eps_max / steps`` (``SINGLE_PASS_STEP_FRACTION * eps_max`` for steps = 0),
        ``eps_max`` the largest radius the radius policy gives for base radius ``eps``."""
        largest = eps * (1 + self.delta_eps) if self.radius == "confidence" else eps
        return STEP_OVER_RADIUS * largest / steps if steps else SINGLE_PASS_STEP_FRACTION * largest

    def resolved(self) -> dict:
        """Every field, the step sizes as in force (for reports)."""
        return dict(dataclasses.asdict(self), step_size=self.resolved_step_size,
                    lpl_step_size=self.resolved_lpl_step_size)

    def for_method(self, method: str) -> "LPAConfig":
        """The config the method ``method`` (a ``METHODS`` name) trains with: this one with the method's
        fixed settings (e.g. ``loss="la"`` for the "la" methods)."""
        overrides = METHODS[method].meta.get("overrides", {})
        return dataclasses.replace(self, **overrides) if overrides else self

    def settings_for(self, method: str) -> dict:
        """``{field: value}`` of the settings the method ``method`` (a ``METHODS`` name) reads: its own,
        those of its direction and radius policies, the loss's."""
        entry, config = METHODS[method], self.for_method(method)
        names = list(entry.meta.get("settings", ()))
        if entry.meta.get("policies"):
            names += ["direction", "radius"]
            rules = [RADII[config.radius]] + ([] if isinstance(config.direction, torch.Tensor) else [DIRECTIONS[config.direction]])
            names += [name for rule in rules for name in rule.meta.get("settings", ())]
        names += ["loss", "tau"] if config.loss == "la" else []
        names += ["backend"] if entry.meta.get("policies") else []
        values = config.resolved()
        return {name: values[name] for name in dict.fromkeys(names)}


def _check_number(config: LPAConfig, name: str, rule: str, holds: Callable[[float], bool]) -> None:
    """A finite real number (int or float, not bool) for which ``holds`` is true."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number {rule}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and holds(value)):
        raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
