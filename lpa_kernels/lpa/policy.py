"""Per-class direction and radius policies (SPEC section 1), and the per-class batch statistics they read.

Under ``torch.distributed`` (initialised, world size > 1) the statistics are summed over every process
before a policy reads them, so every rank derives the same direction and radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lpa_kernels._common import compute_dtype
from lpa_kernels.lpa.collectives import all_reduce_sum, world_size  # noqa: F401 (site.py imports them from here)
from lpa_kernels.lpa.config import LPAConfig
from lpa_kernels.lpa.policies import DIRECTIONS, RADII, ClassInputs
from lpa_kernels.lpa.registry import Entry

# A class whose batch radius policy gives 0 (e.g. "confidence_linear" for a class absent or exactly on the
# confidence threshold) gets this fraction of eps instead, because the PGD ops require eps > 0; its direction is 0 there, so delta stays ~0.
MIN_RADIUS_FRACTION = 1e-6


def class_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, K)`` float32 (float64 for float64 logits), summed over the (global) batch: sample counts,
    sums of the true-class softmax probability, sums of the cross-entropy."""
    return class_stats_from_log_probs(logits.detach().to(compute_dtype(logits.dtype)).log_softmax(dim=1), labels, num_classes)


def class_stats_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``class_stats`` from the log-softmax ``(B, K)`` of the logits in their compute dtype (the training
    cross-entropy computes it anyway, so the single-pass step reuses it)."""
    log_p_true = log_probs.detach().gather(1, labels[:, None].long())
    rows = torch.cat([torch.ones_like(log_p_true), log_p_true.exp(), -log_p_true], dim=1)
    stats = torch.zeros(num_classes, 3, dtype=rows.dtype, device=rows.device).index_add_(0, labels, rows).T.contiguous()
    return all_reduce_sum(stats, "class statistics")


def _means(stats: torch.Tensor):
    """``(present (K,) bool, mean p_true (K,), mean CE (K,))`` from ``class_stats``.

    A class whose sums are not finite (a non-finite sample, e.g. an Inf input) counts as absent from the
    batch, so its NaN cannot reach the other classes through the confidence threshold or the loss trend;
    its means are 0. Done with ``torch.where`` on the device (no sync)."""
    counts, p_sum, ce_sum = stats
    finite = torch.isfinite(p_sum) & torch.isfinite(ce_sum)
    samples = counts.clamp_min(1)
    return (counts > 0) & finite, torch.where(finite, p_sum / samples, 0.0), torch.where(finite, ce_sum / samples, 0.0)


def _rejected(stats: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: classes in the batch whose statistics are not finite (``_means`` drops them)."""
    counts, p_sum, ce_sum = stats
    return (counts > 0) & ~(torch.isfinite(p_sum) & torch.isfinite(ce_sum))


@dataclass(frozen=True)
class _Rule:
    """A policy chosen for one role ("direction" or "radius")."""

    kind: str
    entry: Entry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def meta(self) -> dict:
        return self.entry.meta


class Policy:
    """Turns the config's direction/radius choice into ``(direction (K,), eps (K,))`` for one PGD run.

    ``config.direction`` names a registered direction policy (``policies.DIRECTIONS``) or is the user's
    ``(K,)`` tensor; ``config.radius`` names a registered radius policy (``policies.RADII``). ``eps`` is the
    site's base radius. Batch-independent policies are evaluated once (float64, host) and cached per device
    and dtype; batch policies run on the device without a sync. The step size is the same for every class.
    """

    def __init__(self, config: LPAConfig, num_classes: int, eps: float, class_counts: torch.Tensor | None):
        self.config, self.num_classes, self.eps = config, num_classes, eps
        direction = config.direction
        if isinstance(direction, torch.Tensor) and tuple(direction.shape) != (num_classes,):
            raise ValueError(f"direction must be a policy name or a ({num_classes},) tensor, got shape {tuple(direction.shape)}")
        self.direction_rule = None if isinstance(direction, torch.Tensor) else DIRECTIONS[direction]
        self.radius_rule = RADII[config.radius]
        # the named policies in the order resolve returns them (a user's direction tensor is not a rule)
        self.rules = ([] if self.direction_rule is None else [_Rule("direction", self.direction_rule)]) + [
            _Rule("radius", self.radius_rule)]
        counted = [f"{rule.kind}={rule.name!r}" for rule in self.rules if rule.meta.get("needs_counts")]
        if counted and class_counts is None:
            raise ValueError(f"{' and '.join(counted)} need class_counts, the (K,) number of training samples per class")
        self.counts = None if class_counts is None else torch.as_tensor(class_counts, dtype=torch.float64)
        if self.counts is not None and tuple(self.counts.shape) != (num_classes,):
            raise ValueError(f"class_counts must have shape ({num_classes},), got {tuple(self.counts.shape)}")
        self.loss_ema = self.fall_ema = None  # loss_trend state, (K,) once observed; NaN = class not seen yet
        self._skipped = None  # loss_trend: class statistics left out for being non-finite (a device counter)
        self._fixed = {}  # (kind, device, dtype) -> a batch-independent policy's tensor
        self._user = None  # (user direction tensor, its version, device, dtype), that tensor converted

    @property
    def needs_stats(self) -> bool:
        """Whether ``resolve`` reads the batch's class statistics (from the first PGD step's logits)."""
        return any(rule.meta.get("batch") for rule in self.rules)

    @property
    def tracks_loss(self) -> bool:
        """Whether ``observe`` keeps per-class loss history (a direction that reads the loss trend)."""
        return self.direction_rule is not None and bool(self.direction_rule.meta.get("trend"))

    def _inputs(self, **batch) -> ClassInputs:
        return ClassInputs(self.config, self.eps, self.num_classes, self.counts, **batch)

    def _constant(self, rule: _Rule, like: torch.Tensor) -> torch.Tensor:
        """A batch-independent policy's ``(K,)`` tensor, computed once in float64 and kept on ``like``'s device."""
        key = (rule.kind, like.device, compute_dtype(like.dtype))
        if key not in self._fixed:
            value = rule.entry.value(self._inputs()).double()
            if rule.kind == "radius" and not (value > 0).all():  # once (on the host): the PGD ops skip this check
                raise ValueError(f"the {rule.name!r} radius policy gives eps <= 0 for some class: {value}")
            self._fixed[key] = value.to(like.device, key[2])
        return self._fixed[key]

    def _user_direction(self, direction: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The user's direction tensor on ``device``, converted once (a copy from the host would sync
        every step) and again only when the tensor is replaced or changed in place."""
        key = (direction, direction._version, device, dtype)
        if self._user is None or self._user[0][0] is not direction or self._user[0][1:] != key[1:]:
            self._user = (key, direction.to(device, dtype).contiguous())
        return self._user[1]

    def resolve(self, stats: torch.Tensor | None, like: torch.Tensor):
        """``(direction, eps)`` as ``(K,)`` tensors on ``like``'s device, in its compute dtype."""
        dtype = compute_dtype(like.dtype)
        batch = {}
        if self.needs_stats:
            present, p_c, _ = _means(stats)
            batch = dict(present=present, p_true=p_c.to(dtype))
        if self.tracks_loss:
            batch["trend"] = self._trend_direction().to(like.device, dtype)
        inputs = self._inputs(**batch)
        values = []
        for rule in self.rules:
            if rule.meta.get("batch") or rule.meta.get("trend"):
                value = rule.entry.value(inputs).to(like.device, dtype)
                if rule.kind == "radius":  # the PGD ops need eps > 0 (a class on thr may get 0)
                    value = value.clamp_min(self.eps * MIN_RADIUS_FRACTION)
            else:
                value = self._constant(rule, like)
            values.append(value)
        if self.direction_rule is None:
            values.insert(0, self._user_direction(self.config.direction, like.device, dtype))
        return tuple(values)

    def observe(self, stats: torch.Tensor) -> None:
        """Feed one training batch's class statistics to the "loss_trend" policy.

        Per class, ``loss_ema`` is the running mean loss (started at its first observation) and
        ``fall_ema`` the running per-step decrease of ``loss_ema``, both with factor ``m = trend_momentum``.
        The direction is ``sign(mean_c fall_ema - fall_ema_c)`` over the classes seen so far: classes whose
        loss falls slower than average get +1, faster -1, unseen classes 0. A class whose statistics are
        not finite keeps its running state for this batch (counted in ``skipped_observations``).
        """
        if not self.tracks_loss:
            return
        present, _, loss = _means(stats)
        loss = loss.double()
        if self.loss_ema is None:  # kept on the statistics' device: no host copy per step
            self.loss_ema = torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=loss.device)
            self.fall_ema = torch.zeros(self.num_classes, dtype=torch.float64, device=loss.device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=loss.device)
        self._skipped += _rejected(stats).sum()
        m = self.config.trend_momentum
        first = present & self.loss_ema.isnan()
        seen = present & ~first
        updated = m * self.loss_ema + (1 - m) * loss
        # in place, so that a CUDA graph replaying the training step carries the state across replays
        self.fall_ema.copy_(torch.where(seen, m * self.fall_ema + (1 - m) * (self.loss_ema - updated), self.fall_ema))
        self.loss_ema.copy_(torch.where(seen, updated, torch.where(first, loss, self.loss_ema)))

    @property
    def skipped_observations(self) -> int:
        """Class statistics "loss_trend" left out so far for being non-finite (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    def _trend_direction(self) -> torch.Tensor:
        if self.loss_ema is None:
            return torch.zeros(self.num_classes, dtype=torch.float64)
        seen = ~self.loss_ema.isnan()
        # the mean over the seen classes, without selecting them (a device sync); unseen falls are 0
        mean_fall = self.fall_ema.sum() / seen.sum()
        return torch.where(seen, torch.sign(mean_fall - self.fall_ema), 0.0)
