"""The per-class direction and radius policies (SPEC section 1), one registered function each.

A policy is a function ``(ClassInputs) -> (K,) tensor``: a direction in ``{-1, 0, +1}`` (+1 ascends the
class's loss, i.e. positive augmentation; -1 descends it) or a radius ``> 0``. It must be vectorised and
free of host syncs (no ``.item()``, ``nonzero``, Python branches on tensor values): the batch policies
run every training step, and a fused update kernel must be able to compute the same from the per-class
statistics. Register it with ``DIRECTIONS.register`` / ``RADII.register`` and the flags below; nothing
else needs to change (``LPAConfig`` and the programs read the registries):

- ``batch=True``: it reads the batch's class statistics (``present``, ``p_true``), so it is evaluated
  every PGD run, on the device, in the compute dtype (the built-in ones by the fused policy kernel of
  ``lpa_kernels.step_update``, a registered one by calling it: correct, with a few more launches);
- otherwise it is batch-independent: evaluated once, in float64 on the host, and cached on the device;
- ``needs_counts=True``: it reads ``counts`` (training samples per class), which must then be given;
- ``trend=True``: it reads ``trend``, the "loss_trend" direction of the ``Policy``'s running state;
- ``settings=(...)``: the ``LPAConfig`` fields it reads, shown with the method's settings.

Long-tail policies follow LPL's public code (limengyang1992/lpl, ``lpl-longtail-*``): "split" direction
(head classes descend, tail classes ascend) and "budget" radii (LPL's per-class step counts, here the
radius they reach: LPL takes N_c steps of a fixed size with no projection, so the offset's norm is at
most N_c times the step). "confidence" radius is LPL's Eq. 13 (``lpl-balanced``): a base radius plus a
bonus growing with the class's distance to the confidence threshold, normalised on each side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lpa_kernels.confidence import confidence_gap
from lpa_kernels.lpa.registry import Registry

DIRECTIONS = Registry("direction")
RADII = Registry("radius")

# LPL's split index (head classes) per number of classes, from its CIFAR-10-LT (4 of 10) and
# CIFAR-100-LT (27 of 100) scripts; other class counts take DEFAULT_HEAD_FRACTION of the classes.
LPL_HEAD_CLASSES = {10: 4, 100: 27}
DEFAULT_HEAD_FRACTION = 0.3


@dataclass(frozen=True)
class ClassInputs:
    """What a policy may read; every tensor is ``(K,)``.

    ``config``: the ``LPAConfig``; ``eps``: the site's base radius (``eps`` for LPA, ``lpl_eps`` for LPL);
    ``counts``: training samples per class (float64, host) or None; ``present`` (bool) and ``p_true`` (mean
    true-class probability, 0 where absent): the batch's class statistics, None for batch-independent
    policies; ``trend``: the "loss_trend" direction, None unless the policy asks for it."""

    config: Any  # the LPAConfig (not imported: config.py imports this module for the policy names)
    eps: float
    num_classes: int
    counts: torch.Tensor | None = None
    present: torch.Tensor | None = None
    p_true: torch.Tensor | None = None
    trend: torch.Tensor | None = None


def head_count(config: Any, num_classes: int) -> int:
    """How many classes are "head" for the split policies: ``head_classes``, else ``round(head_fraction
    * K)``, else LPL's split (``LPL_HEAD_CLASSES``) or ``round(DEFAULT_HEAD_FRACTION * K)``."""
    if config.head_classes is not None:
        return min(config.head_classes, num_classes)
    if config.head_fraction is not None:
        return round(config.head_fraction * num_classes)
    return LPL_HEAD_CLASSES.get(num_classes, round(DEFAULT_HEAD_FRACTION * num_classes))


def head_mask(inputs: ClassInputs) -> torch.Tensor:
    """``(K,)`` bool: the ``head_count`` most frequent classes (ties and no counts: by class index, as LPL,
    whose CIFAR-LT classes are in decreasing frequency)."""
    k = inputs.num_classes
    index = torch.arange(k, dtype=torch.float64)
    if inputs.counts is None:
        rank = index
    else:  # rank by decreasing count, then by index: a stable sort of -count
        order = torch.sort(-inputs.counts, stable=True).indices
        rank = torch.empty_like(index).scatter_(0, order, index)
    return rank < head_count(inputs.config, k)


# ---- directions -------------------------------------------------------------------------------------

@DIRECTIONS.register("confidence", "sign(thr - p_c): classes less sure than the batch's class mean ascend", batch=True)
def confidence_direction(inputs: ClassInputs) -> torch.Tensor:
    return torch.sign(confidence_gap(inputs.p_true, inputs.present))


@DIRECTIONS.register("split", "LPL long-tail: the head classes (head_classes / head_fraction, default "
                     "LPL's 4 of 10, 27 of 100) descend, the others ascend",
                     settings=("head_classes", "head_fraction"))
def split_direction(inputs: ClassInputs) -> torch.Tensor:
    return torch.where(head_mask(inputs), -1.0, 1.0).double()


@DIRECTIONS.register("frequency", "classes with fewer training samples than the median ascend, the others "
                     "descend", needs_counts=True)
def frequency_direction(inputs: ClassInputs) -> torch.Tensor:
    counts = inputs.counts
    return torch.where(counts < torch.quantile(counts, 0.5), 1.0, -1.0).double()


@DIRECTIONS.register("ascent", "+1 for every class")
def ascent(inputs: ClassInputs) -> torch.Tensor:
    return torch.ones(inputs.num_classes, dtype=torch.float64)


@DIRECTIONS.register("descent", "-1 for every class")
def descent(inputs: ClassInputs) -> torch.Tensor:
    return -torch.ones(inputs.num_classes, dtype=torch.float64)


@DIRECTIONS.register("loss_trend", "classes whose loss falls slower than average ascend (running EMA, factor "
                     "trend_momentum)", trend=True,
                     settings=("trend_momentum",))
def loss_trend(inputs: ClassInputs) -> torch.Tensor:
    return inputs.trend


# ---- radii ------------------------------------------------------------------------------------------

@RADII.register("constant", "eps for every class")
def constant_radius(inputs: ClassInputs) -> torch.Tensor:
    return torch.full((inputs.num_classes,), float(inputs.eps), dtype=torch.float64)


@RADII.register("confidence", "LPL Eq. 13: eps * (1 + delta_eps * g_c), g_c = |thr - p_c| over the largest "
                "gap on the class's side of thr", batch=True, settings=("delta_eps",))
def confidence_radius(inputs: ClassInputs) -> torch.Tensor:
    gap = confidence_gap(inputs.p_true, inputs.present)
    tiny = torch.finfo(gap.dtype).tiny
    above, below = gap.clamp_min(0), (-gap).clamp_min(0)  # each class is on one side (or on thr: 0)
    scaled = above / above.amax().clamp_min(tiny) + below / below.amax().clamp_min(tiny)
    return inputs.eps * (1 + inputs.config.delta_eps * scaled)


@RADII.register("confidence_linear", "eps * |thr - p_c| / max_c |thr - p_c| (no base: the class nearest "
                "thr gets ~0)", batch=True)
def confidence_linear_radius(inputs: ClassInputs) -> torch.Tensor:
    size = confidence_gap(inputs.p_true, inputs.present).abs()
    return inputs.eps * size / size.amax().clamp_min(torch.finfo(size.dtype).tiny)


@RADII.register("frequency", "eps * (n_min / n_c) ** gamma: the rarest class gets eps", needs_counts=True,
                settings=("gamma",))
def frequency_radius(inputs: ClassInputs) -> torch.Tensor:
    counts = inputs.counts
    return inputs.eps * (counts.min() / counts.clamp_min(1)) ** inputs.config.gamma


@RADII.register("budget", "LPL long-tail step counts as radii: N_c = round(head_budget * n_c / n_max - 1) + 1 "
                "for head classes, round(tail_budget * n_min / n_c - 1) + 1 for tail ones (at least 1); eps * "
                "N_c / max N", needs_counts=True,
                settings=("head_classes", "head_fraction", "head_budget", "tail_budget"))
def budget_radius(inputs: ClassInputs) -> torch.Tensor:
    counts, config = inputs.counts.clamp_min(1), inputs.config
    steps = torch.where(head_mask(inputs), config.head_budget * counts / counts.max(),
                        config.tail_budget * counts.min() / counts)
    # LPL rounds the step index N - 1 half-to-even (Python's round; torch.round alike), not N itself
    steps = ((steps - 1).round() + 1).clamp_min(1)
    return inputs.eps * steps / steps.max()
