"""Training methods that perturb a model at a named layer: LPA, LPL, LPA+LPL, their logit-adjusted
variants (LA, LA+LPA, LA+LPL, LA+LPA+LPL) and the baselines, registered in ``METHODS``.

Every method follows one protocol::

    method = build_method("lpa", model, num_classes, layer="layer3", config=LPAConfig(steps=0))
    loss, logits = method.training_loss(x, y)
    optimizer.zero_grad(); loss.backward(); method.after_backward(); optimizer.step()
    ...
    method.sync()  # where the loop reads the device anyway (logging), once per epoch at the latest

The step reads nothing back from the device; ``sync`` raises the errors it could only find there (a
label outside ``[0, K)``; under data parallelism, ranks whose LPA all-reduces went out of step).
``training_loss`` runs the lower network once, whatever the method; ``model(x)`` itself is never modified,
so evaluation (``model.eval(); model(x)``) sees the plain model.

Logit adjustment (``LPAConfig.loss == "la"``, forced by the "la" methods): every training cross-entropy,
the PGD steps' included, is taken on ``logits + tau * log(prior)`` with ``prior = class_counts / sum``
(Menon et al. 2021); the model's own logits, which evaluation uses, are not shifted. LPL's offset is
learned on the adjusted logits, as in LPL's long-tail code.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from lpa_kernels import _checks, backend as _backend
from lpa_kernels._common import compute_dtype
from lpa_kernels.lpa import head_loss, state as _state
from lpa_kernels.lpa.collectives import begin_training_call, local_only, raise_if_out_of_order
from lpa_kernels.lpa.config import LPAConfig
from lpa_kernels.lpa.labels import LabelGuard
from lpa_kernels.lpa.policy import Policy
from lpa_kernels.lpa.registry import METHODS
from lpa_kernels.lpa.site import ClassSite, frozen_batchnorm_stats
from lpa_kernels.lpa.split import explicit_split, trace_split


def _identity_upper(z, extras):
    return z


def logit_adjustment(class_counts, tau: float) -> torch.Tensor:
    """``(K,)`` float64 ``tau * log(n_c / sum n)``, the shift of the logit-adjusted loss."""
    if class_counts is None:
        raise ValueError("loss='la' (logit adjustment) needs class_counts, the (K,) training samples per class")
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if not (counts > 0).all():
        raise ValueError(f"loss='la' needs every class_counts entry > 0 (log prior), got {counts.tolist()}")
    return tau * (counts / counts.sum()).log()


class AdjustedLinear:
    """The classifier ``linear`` with ``shift (K,)`` added to its bias, for the fused ``head_pgd_`` path
    under logit adjustment: it reads ``weight``, ``bias``, ``in_features``, ``out_features``."""

    def __init__(self, linear: nn.Linear, shift: Callable[[torch.Tensor], torch.Tensor]):
        self.linear, self.shift = linear, shift
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor:
        shift = self.shift(self.linear.weight)
        return shift if self.linear.bias is None else self.linear.bias + shift


class Method:
    """Plain training (ERM) through the split model; the other methods override ``_features`` (how the
    layer's activations are perturbed) or ``_forward_loss``."""

    name = "erm"

    def __init__(self, model: nn.Module, num_classes: int, layer: str | None = None,
                 config: LPAConfig | None = None, class_counts: torch.Tensor | None = None,
                 lower: Callable | None = None, upper: Callable | None = None):
        _checks.check_count("num_classes", num_classes, 1)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "pass the unwrapped model (ddp.module): the method runs the model in two parts, which "
                "bypasses DDP's forward and so its gradient synchronisation; wrap method.as_module() in "
                "DDP instead (the deltas are kept in sync by the method itself)")
        self.model, self.num_classes, self.layer = model, num_classes, layer
        self.config = config if config is not None else LPAConfig()
        if lower is not None or upper is not None:
            if lower is None or upper is None:
                raise ValueError("pass both lower= and upper= (or neither, to split the model at layer=)")
            self.split = explicit_split(lower, upper)
        elif layer is None:
            raise ValueError("layer= (the dotted name of a submodule) is required to split the model")
        else:
            self.split = trace_split(model, layer)
        # where BatchNorm statistics must not move during extra upper forwards
        self._norm_scope = self.split.upper if isinstance(self.split.upper, nn.Module) else model
        self._counts = dict(lower_forwards=0, upper_forwards=0, training_steps=0, pgd_steps=0)
        self._shift = logit_adjustment(class_counts, self.config.tau) if self.config.loss == "la" else None
        self._shifts = {}  # (device, dtype) -> the logit-adjustment shift there
        self._counting = True  # False inside a compiled training call (see compiled_training_loss)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the training loss reads: ``logits + tau * log(prior)`` under logit adjustment."""
        return logits if self._shift is None else logits + self._shift_like(logits)

    def _shift_like(self, like: torch.Tensor) -> torch.Tensor:
        """The logit-adjustment shift on ``like``'s device and dtype, copied there once."""
        key = (like.device, like.dtype)
        if key not in self._shifts:
            self._shifts[key] = self._shift.to(like.device, like.dtype)
        return self._shifts[key]

    def __repr__(self) -> str:
        delta = getattr(self, "delta", None)  # the class-perturbation methods' learned state
        shown = "" if delta is None else f", delta={tuple(delta.shape)}"
        settings = "".join(f", {k}={v!r}" for k, v in self.config.settings_for(self.name).items())
        return (f"{type(self).__name__}({self.name!r}, layer={self.layer!r}, num_classes={self.num_classes}"
                f"{shown}{settings})")

    def _count(self, name: str, n: int = 1) -> None:
        if self._counting:
            self._counts[name] += n

    def _lower(self, x):
        self._count("lower_forwards")
        h, extras = self.split.lower(x)
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"the layer {self.layer!r} must output one tensor (B, *F), got {type(h).__name__}; "
                             "choose a layer with a tensor output, or pass lower= and upper=")
        return h, extras

    def _upper(self, h, extras):
        self._count("upper_forwards")
        return self.split.upper(h, *extras)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor):
        """``(loss, logits)`` for one training batch: mean cross-entropy of the perturbed forward (mixed
        cross-entropy for mixup); ``logits`` are the upper network's output for that forward.

        A call that raises changes no counter. The class-perturbation methods check the labels' dtype and
        shape before the lower network runs; CPU labels' values too (a ``ValueError`` before anything
        changes). GPU labels' values are checked on the device, without a sync: a batch with a label
        outside ``[0, K)`` changes no delta, class statistic or policy state, its loss is NaN with a zero
        gradient, and the next ``sync`` raises the ``ValueError`` (``lpa.labels``)."""
        if self._counting:
            begin_training_call()  # every call, failed ones too: the distributed order guard counts them
        y = self._check_labels(x, y)
        counts = dict(self._counts) if self._counting else None
        try:
            self._count("training_steps")
            h, extras = self._lower(x)
            return self._forward_loss(h, tuple(extras), y)
        except Exception:
            if counts is not None:
                self._counts = counts
            raise

    def compiled_training_loss(self, **options) -> Callable:
        """``training_loss`` under ``torch.compile(fullgraph=True, **options)`` (e.g. ``mode="reduce-overhead"``
        for CUDA graphs). The first call runs eagerly: it creates the state sized from the first batch
        (deltas, the policies' constant tensors), which a compiled graph must find in place. The T-step
        autograd path differentiates the upper network inside the step, so autograd ops are traced.
        The call counters (``stats()``) are plain ints, which a graph would bake in and recompile for at
        every step: the compiled calls leave them alone and add what the eager first call counted."""
        compiled = torch.compile(self.training_loss, fullgraph=True, **options)
        per_call = {}

        def training_loss(x: torch.Tensor, y: torch.Tensor):
            if not per_call:
                before = dict(self._counts)
                result = self.training_loss(x, y)
                per_call.update({name: self._counts[name] - before[name] for name in before})
                return result
            self._check_labels_outside_graph(x, y)
            begin_training_call()
            self._counting = False
            try:
                with tracing_autograd():
                    result = compiled(x, y)
            finally:
                self._counting = True
            for name, n in per_call.items():
                self._counts[name] += n
            return result

        return training_loss

    def _check_labels(self, x, y) -> torch.Tensor:
        """Validate the batch's labels before anything runs; returns the labels the step uses (the
        baselines leave the check to cross-entropy, which reads int64: int32 labels are widened)."""
        return y.long() if isinstance(y, torch.Tensor) and y.dtype == torch.int32 else y

    def _check_labels_outside_graph(self, x, y) -> None:
        """Before a compiled call: what ``_check_labels`` raises at once in eager mode but a graph cannot (a
        raise that depends on values); nothing for the baselines."""

    def sync(self) -> None:
        """Raise what the training steps since the last call could only find by reading the device (a
        label outside ``[0, K)``: ``ValueError``; under data parallelism, ranks whose LPA all-reduces went
        out of step: ``collectives.CollectiveOrderError``). One host read (two under data parallelism);
        call it where the training loop reads the device anyway (the loss, for logging), and once per
        epoch at the latest."""

    def _forward_loss(self, h, extras, y):
        logits = self._upper(self._features(h, extras, y), extras)
        return F.cross_entropy(self._adjusted(logits), y), logits

    def _features(self, h, extras, y, preview=False):
        """The activations the training forward continues from (identity for ERM). ``preview``: for
        ``diagnostics``, compute them without changing any state."""
        return h

    def as_module(self) -> nn.Module:
        """An ``nn.Module`` holding the model whose ``forward(x, y)`` is ``training_loss(x, y)``: wrap it in
        ``DistributedDataParallel`` for data-parallel training, so DDP sees the whole training forward."""
        return _TrainingLoss(self)

    def after_backward(self) -> None:
        """Call between ``loss.backward()`` and ``optimizer.step()`` (single-pass delta updates)."""

    def state_dict(self) -> dict:
        """The method's state beyond the model's weights, for checkpoints: copies of its counters and, for
        LPA/LPL, delta, the finiteness guard's counts and the policy's running state (keys and shapes:
        ``lpa_kernels.lpa.state``). ``as_module().state_dict()`` holds the same under ``lpa_state.``.
        Runs ``sync`` first: a checkpoint is not written over a bad batch unnoticed."""
        self.sync()
        return {k: v.detach().clone() for k, v in _state.state_tensors(self).items()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Take over ``state`` from ``state_dict()``. Every key is checked first: an unknown key, a wrong
        shape (named with the shape expected) or, with ``strict``, a missing key raises ``ValueError``
        and changes nothing."""
        _state.load_state(self, state, strict)

    def stats(self) -> dict:
        """Call counts: ``lower_forwards``, ``upper_forwards`` (autograd forwards of the upper network:
        training forwards, PGD steps, probes; the fused head path runs none), ``training_steps``, ``pgd_steps``."""
        return dict(self._counts)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Expansive vs contractive perturbation (SPEC section 1) on one batch, model in eval mode.

        With ``h`` the layer's activations and ``h~`` the perturbation this method would train with:
        ``expansive_fraction (K,)`` share of each class's samples with ``||h~|| > ||h||``, ``norm_ratio
        (K,)`` mean ``||h~|| / ||h||`` per class over samples with ``h != 0`` (NaN for classes absent from the batch), and
        ``amplification`` the mean ``||upper(h~) - upper(h)|| / ||h~ - h||`` over samples with ``h~ != h``
        (NaN if none). No state changes (deltas, counters, loss history) are kept. Under ``torch.distributed``
        it is local to this process (its preview PGD sums nothing over the ranks and issues no collective),
        so one rank may call it alone, e.g. for logging.
        """
        counts, modes = dict(self._counts), {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            h, extras = self.split.lower(x)
            extras = tuple(extras)
            with local_only():
                perturbed = self._features(h, extras, y, preview=True)
            logits, perturbed_logits = self.split.upper(h, *extras), self.split.upper(perturbed, *extras)
        finally:
            for module, training in modes.items():  # each its own mode (a frozen BatchNorm stays in eval)
                module.training = training
            self._counts = counts
        norm = lambda t: torch.linalg.vector_norm(t.flatten(1).double(), dim=1)  # noqa: E731
        base, new, moved = norm(h), norm(perturbed), norm(perturbed - h)
        valid = base > 0  # the norm ratio of an all-zero activation is undefined: left out
        rows = torch.stack([torch.ones_like(base), (new > base).double(), valid.double(),
                            torch.where(valid, new / base.clamp_min(1e-300), 0.0)], dim=1)
        sums = torch.zeros(self.num_classes, 4, dtype=torch.float64, device=h.device).index_add_(0, y, rows)
        mean = lambda col, n: torch.where(n > 0, sums[:, col] / n.clamp_min(1), float("nan"))  # noqa: E731
        changed = moved > 0
        ratio = norm(perturbed_logits - logits)[changed] / moved[changed]
        return {
            "expansive_fraction": mean(1, sums[:, 0]).cpu(),
            "norm_ratio": mean(3, sums[:, 2]).cpu(),
            "amplification": float(ratio.mean()) if ratio.numel() else float("nan"),
        }


def tracing_autograd():
    """Dynamo's switch to trace ``torch.autograd.grad`` (the T-step autograd path) where this torch has it
    (2.13 does); elsewhere that path breaks the graph, which ``fullgraph=True`` reports."""
    config = torch._dynamo.config
    return config.patch(trace_autograd_ops=True) if hasattr(config, "trace_autograd_ops") else contextlib.nullcontext()


class _TrainingLoss(nn.Module):
    """``forward(x, y)`` is ``method.training_loss``; ``state_dict()`` holds the model's entries under
    ``model.`` and the method's state (delta, policy state, counters) under ``lpa_state.``."""

    def __init__(self, method: Method):
        super().__init__()
        # registered before the model: loading checks and takes the method's state first, so a mismatch
        # there raises before any weight changes
        self.lpa_state = _state.MethodState(method)
        self.model, self._method = method.model, method

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self._method.training_loss(x, y)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after checking every key (unknown, missing with ``strict``, or of
        the wrong shape: ``ValueError`` naming the key and the shape expected) before anything changes."""
        _state.check_module_state(self._method, state_dict, strict)
        return super().load_state_dict(state_dict, strict, assign)


class Dropout(Method):
    name = "dropout"

    def _features(self, h, extras, y, preview=False):
        return F.dropout(h, self.config.dropout_p, training=True)


class Noise(Method):
    name = "noise"

    def _features(self, h, extras, y, preview=False):
        return h + self.config.noise_std * torch.randn_like(h)


class Adversarial(Method):
    """Sample-level adversarial feature perturbation: one FGSM step of size ``adv_eps`` (L-inf) on ``h``."""

    name = "adv"

    def _features(self, h, extras, y, preview=False):
        # the probe is h itself when it is already in a graph (the training forward): differentiating only
        # w.r.t. h leaves the lower network's graph alone, and no requires_grad_() tensor is made, which
        # torch.compile(fullgraph=True) refuses to let flow into the returned loss
        probe = h if h.requires_grad else h.detach().requires_grad_(True)
        detached = tuple(e.detach() if isinstance(e, torch.Tensor) else e for e in extras)
        with frozen_batchnorm_stats(self._norm_scope), torch.enable_grad():
            loss = F.cross_entropy(self._adjusted(self._upper(probe, detached)), y)
            (grad,) = torch.autograd.grad(loss, probe)
        return h + self.config.adv_eps * grad.sign()


class ManifoldMixup(Method):
    """Manifold Mixup at the layer: ``h`` (and every batch tensor crossing the cut) is mixed with a
    shuffled copy with ``lam ~ Beta(alpha, alpha)``; the loss mixes the two targets' cross-entropies."""

    name = "mixup"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Beta's concentration is a tensor of torch's default dtype, where an alpha far below 1e-38 is 0: no
        # distribution. Its own argument check cannot be the guard: torch.compile switches those checks off
        # for the whole process (and cannot trace them), after which the mixing weight was NaN, silently.
        if not torch.tensor(self.config.mixup_alpha) > 0:
            raise ValueError(f"mixup_alpha={self.config.mixup_alpha!r} rounds to 0 in torch's default dtype "
                             f"({torch.get_default_dtype()}): Beta(alpha, alpha) needs alpha > 0 there")

    def _mix(self, h, extras):
        lam = float(torch.distributions.Beta(self.config.mixup_alpha, self.config.mixup_alpha).sample())
        order = torch.randperm(h.shape[0], device=h.device)
        mix = lambda t: lam * t + (1 - lam) * t[order]  # noqa: E731
        batch_like = lambda t: isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[0] == h.shape[0]  # noqa: E731
        return lam, order, mix(h), tuple(mix(e) if batch_like(e) else e for e in extras)

    def _forward_loss(self, h, extras, y):
        lam, order, h, extras = self._mix(h, extras)
        logits = self._upper(h, extras)
        adjusted = self._adjusted(logits)
        return lam * F.cross_entropy(adjusted, y) + (1 - lam) * F.cross_entropy(adjusted, y[order]), logits

    def _features(self, h, extras, y, preview=False):
        return self._mix(h, extras)[2]


class ClassPerturbationMethod(Method):
    """LPA (per-class PGD perturbation at the layer), LPL (per-class PGD offset on the logits, delta
    ``(K, K)``, L2 norm) or both. The returned logits are the upper network's output before LPL's offset.

    The labels are range-checked once per training step on the device (``lpa.labels.LabelGuard``); the
    sites then run the ops on the labels clamped into range, without the ops' host-side check, and gate
    their updates on the check's verdict. The step makes no device sync; ``sync`` raises a bad label.
    """

    def __init__(self, model, num_classes, layer=None, config=None, class_counts=None, lower=None, upper=None,
                 use_lpa: bool = True, use_lpl: bool = False):
        super().__init__(model, num_classes, layer, config, class_counts, lower, upper)
        c = self.config
        self.name = "+".join(n for n, used in (("lpa", use_lpa), ("lpl", use_lpl)) if used)
        self.lpa = self.lpl = None
        self._labels = LabelGuard(num_classes)
        self._batch = None  # the current batch's lpa.labels.CheckedLabels
        self._backends = {}  # device -> config.backend resolved there
        if use_lpa:
            self.lpa = ClassSite(
                num_classes, Policy(c, num_classes, c.eps, class_counts), mode=c.mode, norm=c.norm,
                step_size=c.resolved_step_size, steps=c.steps, init=c.init, layout=c.delta_shape, head=c.head,
                backend=c.backend, norm_scope=self._norm_scope)
        if use_lpl:
            self.lpl = ClassSite(
                num_classes, Policy(c, num_classes, c.lpl_eps, class_counts), mode="add", norm="l2",
                step_size=c.resolved_lpl_step_size, steps=c.lpl_steps, init="fresh" if c.lpl_steps else "carried",
                layout="full", head="never", backend=c.backend, norm_scope=self._norm_scope)

    def _sites(self):
        return [s for s in (self.lpa, self.lpl) if s is not None]

    def _pgd_upper(self, h, extras):
        """What LPA's PGD steps differentiate: the upper network's logits as the training loss reads them."""
        return self._adjusted(self._upper(h, extras))

    def _pgd_head(self):
        """The classifier for LPA's fused head path, its bias shifted under logit adjustment."""
        head = self.split.head
        return head if head is None or self._shift is None else AdjustedLinear(head, self._shift_like)

    def _features(self, h, extras, y, preview=False):
        if self.lpa is None:
            return h
        if preview:
            _checks.check_labels(y, h.shape[0], self.num_classes)
            delta = self.lpa.preview_delta(h, extras, y, self._pgd_upper, self._pgd_head())
        else:
            delta = self._training_delta(h, extras, y)
        return self.lpa.apply(h, y, delta, None if preview else self._batch.plan)

    def _training_delta(self, h, extras, y):
        """LPA's delta for this training batch (``ClassSite.training_delta``: T PGD steps, or the single-pass leaf)."""
        ok = None if self._batch.verified else self._batch.ok  # None: checked on the host, known good
        delta = self.lpa.training_delta(h, extras, y, ok, self._pgd_upper, self._pgd_head(), self._batch.plan)
        self._count("pgd_steps", self.lpa.steps)
        return delta

    def _check_labels(self, x, y) -> torch.Tensor:
        # on the device (no sync)
        device = y.device if isinstance(y, torch.Tensor) else None
        if device not in self._backends:
            self._backends[device] = _backend.resolve(self.config.backend, device or torch.device("cpu"))
        self._batch = self._labels.check(y, _batch_size(x, y), self._backends[device])
        return self._batch.safe

    def _check_labels_outside_graph(self, x, y) -> None:
        # CPU labels' values, read on the host as the eager call reads them (the graph checks them again, on
        # the device, gating the update)
        self._labels.check_on_host(y, _batch_size(x, y))

    def sync(self) -> None:
        self._labels.raise_if_bad()
        raise_if_out_of_order()

    def _forward_loss(self, h, extras, y):
        in_class_space = self._class_space_loss(h, extras, y)
        if in_class_space is not None:
            return in_class_space
        logits = self._upper(self._features(h, extras, y), extras)
        trained = self._adjusted(logits)
        checked = self._batch
        if self.lpl is not None:
            delta = self.lpl.training_delta(trained.detach(), (), y, checked.ok, _identity_upper, plan=checked.plan)
            self._count("pgd_steps", self.lpl.steps)
            trained = self.lpl.apply(trained, y, delta, checked.plan)
        log_probs = None
        if trained.dtype == compute_dtype(trained.dtype):
            # F.cross_entropy is nll_loss(log_softmax): one log-softmax serves the loss and the class
            # statistics. (For half logits F.cross_entropy upcasts under autocast, else not: left to it.)
            log_probs = F.log_softmax(trained, dim=1)
        for site in self._sites():
            site.observe(trained, y, None if checked.verified else checked.ok, log_probs)
        # a batch with a label out of range has loss labels that are all ignore_index: its loss is NaN to
        # whoever reads it, with no gradient to the weights or delta
        labels = checked.loss_labels
        loss = F.cross_entropy(trained, labels) if log_probs is None else F.nll_loss(log_probs, labels)
        return loss, logits

    def _class_space_loss(self, h, extras, y):
        """``(loss, logits)`` of the single-pass training forward at the classifier in class space
        (``lpa.head_loss``: the same loss without the perturbed activations) where it serves: LPA alone, labels
        checked on the host; else None."""
        head, site = self.split.head, self.lpa
        if self.lpl is not None or site is None or head is None or not self._batch.verified:
            return None
        if not site.class_space_ready(h, head):
            return None
        delta = self._training_delta(h, extras, y)  # the leaf, whose gradient is that of the summed loss
        logits = self._upper(h, extras)
        shift = None if self._shift is None else self._shift_like(logits)
        return head_loss.loss(logits, y, delta, head.weight, shift, site.single_pass_stats(logits), h.shape[0])

    def after_backward(self) -> None:
        for site in self._sites():
            self._counts["pgd_steps"] += site.after_backward()

    def stats(self) -> dict:
        """``Method.stats()`` plus the finiteness guard's counts (LPA and LPL together; reading them syncs
        the device, so ``sync`` runs first): ``skipped_class_updates``, class delta updates skipped because
        the class's gradient was not finite, and ``skipped_class_statistics``, non-finite class statistics
        the "loss_trend" policy left out of its running state."""
        self.sync()
        stats = super().stats()
        stats["skipped_class_updates"] = sum(site.skipped_updates for site in self._sites())
        stats["skipped_class_statistics"] = sum(site.policy.skipped_observations for site in self._sites())
        return stats

    @property
    def delta(self) -> torch.Tensor | None:
        """LPA's per-class perturbation ``(K, *P)`` (None before the first batch or without LPA)."""
        return None if self.lpa is None else self.lpa.delta

    @property
    def logit_delta(self) -> torch.Tensor | None:
        """LPL's per-class logit offset ``(K, K)`` (None before the first batch or without LPL)."""
        return None if self.lpl is None else self.lpl.delta


def _batch_size(x, y) -> int:
    """The batch's size: x's first dimension (y's own length for a non-tensor x)."""
    return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else getattr(y, "shape", (-1,))[0]


def _perturbation(use_lpa: bool, use_lpl: bool) -> Callable[..., ClassPerturbationMethod]:
    return lambda *a, **k: ClassPerturbationMethod(*a, **k, use_lpa=use_lpa, use_lpl=use_lpl)


_LPA_SETTINGS = ("mode", "norm", "eps", "step_size", "steps", "init", "delta_shape", "head")
_LPL_SETTINGS = ("lpl_eps", "lpl_step_size", "lpl_steps")
_LA = {"loss": "la"}
METHODS.add("erm", Method, "plain cross-entropy training", settings=())
METHODS.add("lpa", _perturbation(True, False), "LPA: per-class PGD perturbation at the layer",
            settings=_LPA_SETTINGS, policies=True)
METHODS.add("lpl", _perturbation(False, True), "LPL: per-class PGD offset on the logits",
            settings=_LPL_SETTINGS, policies=True)
METHODS.add("lpa+lpl", _perturbation(True, True), "LPA and LPL together", settings=_LPA_SETTINGS + _LPL_SETTINGS,
            policies=True)
METHODS.add("la", Method, "logit-adjusted cross-entropy (tau)", settings=(), overrides=_LA)
METHODS.add("la+lpa", _perturbation(True, False), "LPA with the logit-adjusted loss", settings=_LPA_SETTINGS,
            policies=True, overrides=_LA)
METHODS.add("la+lpl", _perturbation(False, True), "LPL on the logit-adjusted logits (LPL's long-tail method)",
            settings=_LPL_SETTINGS, policies=True, overrides=_LA)
METHODS.add("la+lpa+lpl", _perturbation(True, True), "LPA and LPL with the logit-adjusted loss",
            settings=_LPA_SETTINGS + _LPL_SETTINGS, policies=True, overrides=_LA)
METHODS.add("dropout", Dropout, "dropout on the layer's output (dropout_p)", settings=("dropout_p",))
METHODS.add("noise", Noise, "Gaussian noise on the layer's output (noise_std)", settings=("noise_std",))
METHODS.add("mixup", ManifoldMixup, "manifold mixup at the layer (mixup_alpha)", settings=("mixup_alpha",))
METHODS.add("adv", Adversarial, "one FGSM step on the layer's output per sample (adv_eps)", settings=("adv_eps",))


def build_method(name: str, model: nn.Module, num_classes: int, layer: str | None = None,
                 config: LPAConfig | None = None, class_counts: torch.Tensor | None = None,
                 lower: Callable | None = None, upper: Callable | None = None) -> Method:
    """The training method ``name`` (one of ``METHODS``) for ``model``, perturbing at the submodule
    ``layer`` (dotted name). The model is split there with torch.fx; where it cannot be traced, pass
    ``lower(x) -> h`` and ``upper(h) -> logits`` instead. ``class_counts (K,)``: training samples per
    class, for the "frequency" direction and radius policies."""
    if name not in METHODS:
        raise ValueError(f"name must be one of {', '.join(map(repr, METHODS))}; got {name!r}")
    config = (config if config is not None else LPAConfig()).for_method(name)
    method = METHODS[name].value(model, num_classes, layer, config, class_counts, lower, upper)
    method.name = name
    classifier = _output_linear(method.split.upper, None if layer is None else model.get_submodule(layer))
    if classifier is not None and classifier.out_features != num_classes:
        # caught here, not at the first batch holding a label >= num_classes (or never, for LPA's deltas)
        raise ValueError(f"num_classes={num_classes} but the model's final nn.Linear has out_features="
                         f"{classifier.out_features}: pass the number of classes the model predicts")
    return method


def _output_linear(upper: Callable, cut: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` whose output is ``upper``'s output (the classifier), where the split shows one:
    ``upper`` is that Linear, or an fx graph whose output node calls it, or returns the activations of the
    layer ``cut`` unchanged (the layer is the classifier itself)."""
    if type(upper) is nn.Linear:
        return upper
    if not isinstance(upper, fx.GraphModule):
        return None
    (result,) = [n for n in upper.graph.nodes if n.op == "output"]
    last = result.args[0]
    if isinstance(last, fx.Node) and last.op == "placeholder" and last is next(iter(upper.graph.nodes)):
        module = cut
    elif isinstance(last, fx.Node) and last.op == "call_module":
        module = upper.get_submodule(last.target)
    else:
        return None
    return module if type(module) is nn.Linear else None
