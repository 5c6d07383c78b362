"""``LPAConfig``: every setting of the LPA controller and the baselines, with validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from lpa_kernels import _checks

DIRECTIONS = ("confidence", "frequency", "ascent", "descent", "loss_trend")
RADII = ("constant", "confidence", "frequency")
INITS = ("fresh", "carried")
DELTA_SHAPES = ("full", "channel", "last")
HEAD_PATHS = ("auto", "always", "never")


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
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("step_size", "lpl_step_size", "noise_std", "adv_eps", "gamma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout_p < 1:
            raise ValueError(f"dropout_p must lie in [0, 1), got {self.dropout_p!r}")
        if not 0 <= self.trend_momentum < 1:
            raise ValueError(f"trend_momentum must lie in [0, 1), got {self.trend_momentum!r}")
        if self.init is None:
            self.init = "carried" if self.steps == 0 else "fresh"
        _checks.check_choice("init", self.init, INITS)
        if self.steps == 0 and self.init != "carried":
            raise ValueError("steps=0 (single-pass mode) needs init='carried': delta is updated once per "
                             "training step and must be kept across batches")
