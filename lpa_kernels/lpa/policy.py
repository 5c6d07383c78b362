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
from lpa_kernels.lpa import policies
from lpa_kernels.lpa.policies import DIRECTIONS, RADII, ClassInputs
from lpa_kernels.lpa.registry import Entry
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from lpa_kernels.step_update import naive as step_naive
from lpa_kernels.step_update import op as step_op

# A class whose batch radius policy gives 0 (e.g. "confidence_linear" for a class absent or exactly on the
# confidence threshold) gets this fraction of eps instead, because the PGD ops require eps > 0; its direction is 0 there, so delta stays ~0.
MIN_RADIUS_FRACTION = 1e-6


def class_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, K)`` float32 (float64 for float64 logits), summed over the (global) batch: sample counts,
    sums of the true-class softmax probability, sums of the cross-entropy."""
    log_probs = logits.detach().to(compute_dtype(logits.dtype)).log_softmax(dim=1)
    stats = log_probs.new_empty((3, num_classes))
    return all_reduce_sum(step_naive.class_stats_(stats, log_probs, labels, None, False), "class statistics")


# The built-in batch and trend policies the fused policy kernel computes (``step_update.naive.policy_``),
# by function: a batch-independent policy is a fixed tensor there; any other batch policy (one a user
# registered) makes the site fall back to the rule-by-rule path below.
_FUSED_DIRECTIONS = {policies.confidence_direction: "confidence", policies.loss_trend: "loss_trend"}
_FUSED_RADII = {policies.confidence_radius: "confidence", policies.confidence_linear_radius: "confidence_linear"}


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
        self._kinds = self._fused_kinds()  # the fused policy kernel's choices, None: the rule-by-rule path
        self._bound_update = None  # (host call, its fixed tensors, its scalars) of step_pgd_, to repeat
        # read several times per training step, so computed once: whether ``resolve`` reads the batch's class
        # statistics, and whether ``observe`` keeps per-class loss history (a direction reading the loss trend)
        self.needs_stats = any(rule.meta.get("batch") for rule in self.rules)
        self.tracks_loss = self.direction_rule is not None and bool(self.direction_rule.meta.get("trend"))

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
            # a class whose sums are not finite counts as absent: its NaN reaches no other class
            present, _, p_c, _ = step_naive.class_means(stats)
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
        self._ensure_trend(stats.device)
        step_naive.observe_trend_(stats, self.loss_ema, self.fall_ema, self._skipped, self.config.trend_momentum)

    @property
    def skipped_observations(self) -> int:
        """Class statistics "loss_trend" left out so far for being non-finite (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    def _trend_direction(self) -> torch.Tensor:
        if self.loss_ema is None:
            return torch.zeros(self.num_classes, dtype=torch.float64)
        return step_naive.trend_direction(self.loss_ema, self.fall_ema)

    def _ensure_trend(self, device: torch.device) -> None:
        """Create the "loss_trend" state at its first observation (NaN = class not seen yet)."""
        if self.loss_ema is None:  # kept on the statistics' device: no host copy per step
            self.loss_ema = torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=device)
            self.fall_ema = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    # ----- the fused path ------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """Whether every batch or trend rule is a built-in one, so ``step`` runs the fused policy kernel."""
        return self._kinds is not None

    def _fused_kinds(self) -> tuple[str, str] | None:
        """The fused kernel's ``(direction, radius)`` kinds: a built-in batch or trend policy by name, any
        other "fixed" (batch-independent); None when a batch or trend policy is not a built-in one."""
        kinds = []
        for entry, known in ((self.direction_rule, _FUSED_DIRECTIONS), (self.radius_rule, _FUSED_RADII)):
            kind = known.get(None if entry is None else entry.value, "fixed")
            if kind == "fixed" and entry is not None and (entry.meta.get("batch") or entry.meta.get("trend")):
                return None
            kinds.append(kind)
        return tuple(kinds)

    def head_radius(self, like: torch.Tensor) -> torch.Tensor | None:
        """The radii ``(K,)`` (``like``'s device, compute dtype) when ``head_pgd_`` can apply this policy
        itself, else None: the built-in confidence direction with a batch-independent radius. Its rule in
        ``lpa_kernels.confidence`` is this policy's, read from the same first-step softmax (a class with
        non-finite statistics absent in both), so the fused head path needs no logits of its own for it."""
        if self._kinds != ("confidence", "fixed"):
            return None
        return self._constant(self.rules[-1], like)

    def _params(self, device: torch.device, backend: str):
        """``step_update.naive.PARAMS``: floats for the reference backend, a float64 tensor on ``device``
        for the kernels (made once)."""
        values = (self.eps, self.config.delta_eps, self.eps * MIN_RADIUS_FRACTION, self.config.trend_momentum)
        if backend == "reference":
            return values
        key = ("params", device, torch.float64)
        if key not in self._fixed:
            self._fixed[key] = torch.tensor(values, dtype=torch.float64, device=device)
        return self._fixed[key]

    def step(self, stats: torch.Tensor | None, like: torch.Tensor, observe: bool, clear: bool, backend: str):
        """``(direction, eps)`` (``resolve``), after feeding ``stats`` to the trend state when ``observe``
        (``observe``); ``clear`` zeroes ``stats`` afterwards. Built-in policies (``fused``) take one
        fused kernel (``step_update``) on a kernel backend, a few ops on the reference backend; others
        run ``observe`` and ``resolve``. ``stats`` None: no batch statistics (``needs_stats`` False)."""
        if self._kinds is None:
            if observe:
                self.observe(stats)
            direction_eps = self.resolve(stats, like)
            if clear and stats is not None:
                stats.zero_()
            return direction_eps
        constant, arguments = self._fused_arguments(stats, like, observe, backend)
        if arguments is None:
            return constant
        return step_op.policy_(*arguments, clear, compute_dtype(like.dtype), backend)

    def step_pgd_(self, stats: torch.Tensor | None, delta: torch.Tensor, grad: torch.Tensor, step: torch.Tensor,
                  norm: str, ok: torch.Tensor, skipped: torch.Tensor, backend: str) -> None:
        """The single-pass step's update: ``step(stats, grad, observe=True, clear=True)``, then the guarded
        PGD step of ``delta`` with that direction and radius (``pgd.op.run_guarded_pgd_step_``; ``step`` the
        ``(K,)`` step sizes, ``ok`` 0-d bool, ``skipped`` its 0-d int64 counter). A built-in policy on the
        reference backend's CPU tensors takes one host C++ call for both (``step_update.op.policy_pgd_step_``),
        which the next steps repeat on the same tensors with their gradient (``_bound_update``)."""
        if self._bound_update is not None:
            bound, fixed, scalars = self._bound_update
            trend = (self.loss_ema, self.fall_ema, self._skipped) if self.tracks_loss else (None, None, None)
            tensors = (stats, *fixed, *trend, delta, step, ok, skipped)
            if scalars == (norm, backend, self._params(delta.device, backend)) and bound.repeat(tensors, grad):
                return
            self._bound_update = None
        if self._kinds is None:
            direction, eps = self.step(stats, grad, True, True, backend)
        else:
            (direction, eps), arguments = self._fused_arguments(stats, grad, True, backend)
            if arguments is not None:
                bound = step_op.policy_pgd_step_(*arguments, True, delta, grad, step, norm, ok, skipped, backend)
                # a user's direction tensor is converted anew when it changes (_user_direction): not bound
                if bound is not None and self.direction_rule is not None:
                    # arguments[1:3], the fixed tensors, are _fixed's: made once per device and dtype, never replaced
                    self._bound_update = bound, arguments[1:3], (norm, backend, arguments[6])
                return
        run_guarded_pgd_step_(delta, grad, step, eps, direction, norm, ok, skipped, backend)

    def _fused_arguments(self, stats: torch.Tensor | None, like: torch.Tensor, observe: bool, backend: str):
        """``((direction, eps), arguments)`` for this fused policy: ``arguments``, ``step_op.policy_``'s up to
        ``observe``, or None when nothing depends on the batch and ``(direction, eps)``, the constant tensors
        (None for a kind the kernel computes), are the policy's result itself."""
        dtype = compute_dtype(like.dtype)
        direction_kind, radius_kind = self._kinds
        fixed_direction = fixed_eps = None
        if direction_kind == "fixed":
            fixed_direction = (self._user_direction(self.config.direction, like.device, dtype)
                               if self.direction_rule is None else self._constant(self.rules[0], like))
        if radius_kind == "fixed":
            fixed_eps = self._constant(self.rules[-1], like)
        if stats is None and not self.tracks_loss:  # nothing batch-dependent: the constant tensors themselves
            return (fixed_direction, fixed_eps), None
        if stats is None:  # the trend direction alone (a T-step run): no statistics to read
            stats = torch.zeros((3, self.num_classes), dtype=dtype, device=like.device)
        trend = (None, None, None)
        if self.tracks_loss:
            if observe:
                self._ensure_trend(stats.device)
            trend = (self.loss_ema, self.fall_ema, self._skipped) if self.loss_ema is not None else (
                torch.full((self.num_classes,), float("nan"), dtype=torch.float64, device=stats.device),
                torch.zeros(self.num_classes, dtype=torch.float64, device=stats.device), None)
        params = self._params(stats.device, backend)
        return (fixed_direction, fixed_eps), (stats, fixed_direction, fixed_eps, *trend, params, direction_kind,
                                              radius_kind, observe and self.tracks_loss)
