"""``LPAConfig``: every setting of the LPA controller and the baselines, with validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from lpa_kernels import _checks
from lpa_kernels.backend import BACKENDS

DIRECTIONS = ("confidence", "frequency", "ascent", "descent", "loss_trend")
RADII = ("constant", "confidence", "frequency")
INITS = ("fresh", "carried")
DELTA_SHAPES = ("full", "channel", "last")
HEAD_PATHS = ("auto", "always", "never")


# The fields each method reads (the per-class policies serve LPA and LPL alike); ``settings_for`` shows
# a user the settings in force, so a banner or repr does not list the baselines' knobs for LPA.
_POLICY = ("direction", "radius", "gamma", "trend_momentum")
_LPA = ("mode", "norm", "eps", "step_size", "steps", "init", "delta_shape", "head") + _POLICY
_LPL = ("lpl_eps", "lpl_step_size", "lpl_steps") + _POLICY
METHOD_SETTINGS = {
    "erm": (), "dropout": ("dropout_p",), "noise": ("noise_std",), "mixup": ("mixup_alpha",), "adv": ("adv_eps",),
    "lpa": _LPA + ("backend",), "lpl": _LPL + ("backend",), "lpa+lpl": tuple(dict.fromkeys(_LPA + _LPL)) + ("backend",),
}


@dataclass
class LPAConfig:
    """Settings of LPA (SPEC section 1), LPL and the baselines.

    LPA: ``mode`` ("add" | "scale"), ``norm`` ("linf" | "l2"), radius ``eps``, PGD ``step_size``,
    ``steps`` (T >= 1: T PGD steps per batch on the upper network; 0: single pass, delta carried and
    updated once from the training backward), ``direction`` (a policy name or a ``(K,)`` tensor of signs),
    ``radius`` ("constant" | "confidence" | "frequency" with exponent ``gamma``), ``init`` ("fresh": delta
    starts at 0 every batch | "carried"; None picks "carried" for ``steps == 0`` and "fresh" otherwise),
    ``delta_shape`` ("full" ``(K, *F)`` | "channel" ``(K, F[0], 1, ..)`` | "last" ``(K, 1, .., F[-1])``),
    ``head`` ("auto" | "always" | "never": the fused ``head_pgd_`` path when the layer feeds the final
    ``nn.Linear`` classifier directly), ``trend_momentum`` (EMA factor of the "loss_trend" policy).
    LPL: ``lpl_eps``, ``lpl_step_size``, ``lpl_steps`` (L2 PGD on a ``(K, K)`` logit offset; fresh when
    ``lpl_steps >= 1``, carried single pass when 0). Baselines: ``noise_std``, ``dropout_p``,
    ``mixup_alpha``, ``adv_eps``. ``backend`` is passed to every op.
    """

    mode: str = "add"
    norm: str = "l2"
    eps: float = 1.0
    step_size: float = 0.25
    steps: int = 3
    direction: Union[str, torch.Tensor] = "confidence"
    radius: str = "constant"
    gamma: float = 1.0
    init: Optional[str] = None
    delta_shape: str = "full"
    head: str = "auto"
    trend_momentum: float = 0.9
    lpl_eps: float = 1.0
    lpl_step_size: float = 0.1
    lpl_steps: int = 5
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
            _checks.check_choice("direction", self.direction, DIRECTIONS)
        _checks.check_choice("radius", self.radius, RADII)
        _checks.check_choice("delta_shape", self.delta_shape, DELTA_SHAPES)
        _checks.check_choice("head", self.head, HEAD_PATHS)
        for name in ("steps", "lpl_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("eps", "lpl_eps", "mixup_alpha"):
            _check_number(self, name, "> 0", lambda v: v > 0)
        for name in ("step_size", "lpl_step_size", "noise_std", "adv_eps", "gamma"):
            _check_number(self, name, ">= 0", lambda v: v >= 0)
        for name in ("dropout_p", "trend_momentum"):
            _check_number(self, name, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.init is None:
            self.init = "carried" if self.steps == 0 else "fresh"
        _checks.check_choice("init", self.init, INITS)
        if self.steps == 0 and self.init != "carried":
            raise ValueError("steps=0 (single-pass mode) needs init='carried': delta is updated once per "
                             "training step and must be kept across batches")


    def settings_for(self, method: str) -> dict:
        """``{field: value}`` of the settings the method ``method`` (a ``METHODS`` name) reads."""
        return {name: getattr(self, name) for name in METHOD_SETTINGS[method]}


def _check_number(config: LPAConfig, name: str, rule: str, holds: Callable[[float], bool]) -> None:
    """A real number (int or float, not bool; NaN fails every rule) for which ``holds`` is true."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not holds(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")
