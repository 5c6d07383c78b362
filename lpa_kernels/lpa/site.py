"""``ClassSite``: one per-class perturbation learned by PGD, at the LPA layer or on the logits (LPL).

T-step mode (``steps >= 1``): the lower network's output ``h`` is given once; each step re-runs only
``upper`` on ``perturb(h.detach(), y, delta)``, takes the class-summed gradient of the summed
cross-entropy and applies ``pgd_step_``; the training forward then uses ``delta.detach()``. When
``upper`` is exactly the final ``nn.Linear`` the whole loop is one ``head_pgd_`` call (no autograd).

Single-pass mode (``steps == 0``, delta carried): the training forward perturbs with the perturbation
module's leaf sharing delta's storage (``ClassPerturbation.live_delta``); each training backward adds the
batch's class gradient to that leaf's ``.grad`` (so several micro-batches before one ``after_backward``
sum, as one large batch would), and ``after_backward`` applies one ``pgd_step_`` from the sum. At the final
``nn.Linear`` on the reference backend's host kernels the method computes that forward in class space
instead (``lpa.head_loss``: the logits of ``h`` plus a class row of ``delta W^T``, the loss and the class
statistics in one host call, the same gradients into the same leaf, no perturbed activations formed).

The per-step update is a few fused ops (``lpa_kernels.step_update``, one kernel each on the Triton and
CUDA backends, a few torch ops on the reference backend): each training forward adds its class
statistics (counts, sums of the true-class probability and of the cross-entropy) into a persistent
``(3, K)`` buffer; ``after_backward`` runs the policy (means, finiteness, confidence threshold and gaps,
the loss-trend update, direction and radius; the buffer cleared) and the guarded PGD step (one host C++
call for both on the reference backend's CPU tensors, ``Policy.step_pgd_``). On those tensors the host
calls a step makes on its state (the statistics, the update, the head path's ``head_pgd_``) are bound once
and repeated on the next batches (``_host_ext.BoundCall``: their checks cost more than the kernels). Only the
built-in batch policies have a fused form; a policy a user registered with ``batch=True`` or
``trend=True`` runs rule by rule in PyTorch (``Policy.step``), as correct, with more launches.

Validation, without a host read: the method checks each batch's labels on the device
(``lpa.labels.LabelGuard``) and hands the site the labels clamped into range plus ``ok``, a 0-d bool
tensor; the site gates every update on ``ok`` (a bad batch changes no delta, statistic or policy state).
The site calls the ops' internal entry points, which skip the host-side label and radius checks (the
policy's radii are positive by construction), so the training step reads nothing back from the device.

Finiteness guard (one bad sample never ends training): on every path that updates delta (T-step fresh
and carried, autograd and head, single pass; the LPL site alike), a class whose gradient, or whose new
delta on the fused head path, is not finite keeps its previous delta for that step. It is done on the
device (``torch.where``, no host sync), and the skipped class updates are counted (``skipped_updates``,
reported by ``Method.stats()``). The policies treat a class with non-finite statistics as absent from the
batch (``step_update.naive.class_means``). The training loss of such a batch is still non-finite: skip
that optimizer step, as ``GradScaler`` does.

Class gradient, defined so that data-parallel training equals one process on the whole batch: the
gradient of the cross-entropy SUMMED over the global batch. T-step mode differentiates the summed loss
directly; single-pass mode multiplies the gradient of the local mean loss by the local batch size.
Under ``torch.distributed`` (world size > 1) it is all-reduced (summed) before every step, and the
policies read statistics summed over all processes, so every rank keeps the same delta (single pass: the
class gradient and the statistics in one all-reduce, at ``after_backward``). Ranks the collective-order
guard finds out of step update nothing: their all-reduces return zeros (a class whose gradient is all zero
keeps its delta; classes absent from zeroed statistics leave the policies as they were), a fresh delta
zeroed before them is restored after them (``collectives.order_ok``), and ``Method.sync`` raises.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpa_kernels import backend as _backend
from lpa_kernels._common import compute_dtype, per_class
from lpa_kernels.lpa import head_loss
from lpa_kernels.lpa.collectives import all_reduce_sum_together, order_ok
from lpa_kernels.lpa.policy import Policy, all_reduce_sum, world_size
from lpa_kernels.head_pgd.op import run_head_pgd_
from lpa_kernels.nn.perturbation import ClassPerturbation
from lpa_kernels.perturb.op import run_perturb
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from lpa_kernels.step_update.op import class_stats_


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module):
    """Extra forwards (PGD steps, probes) leave BatchNorm running statistics as they were: within the
    block, the training-mode norms of ``module`` stop tracking them (``track_running_stats`` False). Their
    output is the same (training mode normalises by the batch's statistics either way), and no buffer is
    written: restoring the buffers afterwards would bump the version of those the pending training graph
    saved, and the forward hook that marked which norms ran cannot be traced by ``torch.compile``."""
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def delta_shape_for(feature_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Per-class perturbation shape ``P`` for features ``F``: full, channel ``(F[0], 1, ..)`` or last ``(1, .., F[-1])``."""
    if layout == "full" or len(feature_shape) <= 1:
        return tuple(feature_shape)
    ones = (1,) * (len(feature_shape) - 1)
    return (feature_shape[0],) + ones if layout == "channel" else ones + (feature_shape[-1],)


class ClassSite:
    """PGD state and steps for one per-class perturbation (``delta`` created at the first batch)."""

    def __init__(self, num_classes: int, policy: Policy, *, mode: str, norm: str, step_size: float,
                 steps: int, init: str, layout: str, head: str, backend: str, norm_scope: nn.Module):
        self.num_classes, self.policy = num_classes, policy
        self.mode, self.norm, self.step_size, self.steps, self.init = mode, norm, step_size, steps, init
        self.layout, self.head_choice, self.backend, self.norm_scope = layout, head, backend, norm_scope
        self.perturbation: ClassPerturbation | None = None
        self._step_sizes = self._resolved_backend = None  # for delta's device and dtype, set with delta
        self._skipped = None  # class updates skipped for a non-finite gradient: a device counter, set with delta
        self._loaded_unchecked = False  # a delta loaded before the first batch, not yet checked against one
        self._pending = False  # single pass: a training forward ran since the last after_backward
        self._stats = None  # single pass: (3, K) class statistics summed over those forwards, zero after each update
        self._bound_stats = None  # single pass: the host call adding a batch's statistics to _stats (_batch_stats)
        self._bound_head = None  # T steps at the head: (host head_pgd call, its radii, steps/norm/mode) to repeat

    @property
    def delta(self) -> torch.Tensor | None:
        return None if self.perturbation is None else self.perturbation.delta

    def _ensure(self, h: torch.Tensor) -> ClassPerturbation:
        if self.perturbation is None:
            self._create(delta_shape_for(tuple(h.shape[1:]), self.layout), compute_dtype(h.dtype), h.device)
        elif self._loaded_unchecked:
            self._adopt_loaded(h)
        return self.perturbation

    def _adopt_loaded(self, h: torch.Tensor) -> None:
        """The first batch after a checkpoint was loaded into a site that had not trained yet: the loaded
        delta must have the per-class shape this layer's activations give (``ValueError`` otherwise, delta
        unchanged), and takes the dtype and device the site would have made it with, as a trained site's
        load does."""
        shape, loaded, dtype = delta_shape_for(tuple(h.shape[1:]), self.layout), self.perturbation.delta, compute_dtype(h.dtype)
        if tuple(loaded.shape[1:]) != shape:
            raise ValueError(f"the loaded delta has per-class shape {tuple(loaded.shape[1:])}, but this layer's "
                             f"activations {tuple(h.shape[1:])} give {shape} (layout {self.layout!r})")
        if (loaded.dtype, loaded.device) != (dtype, h.device):
            self._create(shape, dtype, h.device)
            with torch.no_grad():
                self.perturbation.delta.copy_(loaded)
        self._loaded_unchecked = False

    def _create(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.perturbation = ClassPerturbation(
            self.num_classes, shape, mode=self.mode, eps=self.policy.eps, step_size=self.step_size,
            norm=self.norm, backend=self.backend, dtype=dtype, device=device)
        # what every PGD step passes to the op, made once
        self._step_sizes = per_class(self.step_size, self.num_classes, self.perturbation.delta)
        self._resolved_backend = _backend.resolve(self.backend, device)
        self._all_ok = torch.ones((), dtype=torch.bool, device=device)  # the label verdict where none applies
        # the count survives a reload of delta onto another device
        self._skipped = torch.zeros((), dtype=torch.int64, device=device) if self._skipped is None else self._skipped.to(device)

    @property
    def skipped_updates(self) -> int:
        """Class updates skipped so far because the class's gradient was not finite (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    def load(self, delta: torch.Tensor) -> None:
        """Take ``delta (K, *P)`` as the carried perturbation (from a checkpoint); before the first batch it
        is checked against that batch (``_adopt_loaded``)."""
        if self.perturbation is None or self.perturbation.delta.shape != delta.shape:
            self._loaded_unchecked = self.perturbation is None or self._loaded_unchecked
            self._create(tuple(delta.shape[1:]), delta.dtype, delta.device)
        with torch.no_grad():
            self.perturbation.delta.copy_(delta)

    def apply(self, h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor,
              plan: torch.Tensor | None = None) -> torch.Tensor:
        """``perturb(h, labels, delta)``; ``labels`` range-checked by the caller (see the module docstring),
        ``plan`` their ``_common.label_plan`` (built once per training step) or None. The single-pass leaf
        (``training_delta``) gets the class gradient of the summed loss: the mean loss's times the batch size,
        so micro-batches of any sizes add up exactly."""
        single_pass_leaf = self.perturbation is not None and delta is self.perturbation.live_delta()
        grad_scale = h.shape[0] if single_pass_leaf else 1
        return run_perturb(h, labels, delta, self.mode, self._resolved_backend or self.backend, plan, grad_scale)

    def _pgd_step(self, delta: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor,
                  ok: torch.Tensor | None, skipped: torch.Tensor) -> None:
        """``pgd_step_`` with the policy's ``(K,)`` direction and radii (positive by construction), guarded
        (``pgd.naive.guarded_pgd_step_``, one launch on the Triton backend): a class whose gradient is not
        finite keeps its delta and is counted into ``skipped`` (0-d int64, in place), and every class
        keeps its delta when ``ok`` (0-d bool, the batch's label check) is False."""
        run_guarded_pgd_step_(delta, grad, self._step_sizes, eps, direction, self.norm,
                              self._all_ok if ok is None else ok, skipped, self._resolved_backend)

    # ----- T-step PGD -----------------------------------------------------------------------------
    def _head(self, head: nn.Linear | None, h: torch.Tensor, delta: torch.Tensor) -> nn.Linear | None:
        """The classifier for the fused path, if it applies (and the config allows it)."""
        if self.head_choice == "never" or self.steps == 0:
            return None
        fits = (head is not None and head.out_features == self.num_classes and world_size() == 1
                and math.prod(h.shape[1:]) == head.in_features == math.prod(delta.shape[1:]))
        if self.head_choice == "always" and not fits:
            raise ValueError("head='always' needs the layer to feed the final nn.Linear(D, K) classifier directly, "
                             "a full per-class delta of D values, steps >= 1 and a single process")
        return head if fits else None

    def run_pgd(self, delta: torch.Tensor, h: torch.Tensor, extras: tuple, labels: torch.Tensor,
                upper: Callable, skipped: torch.Tensor, head: nn.Linear | None = None,
                ok: torch.Tensor | None = None, plan: torch.Tensor | None = None) -> None:
        """``self.steps`` PGD steps on ``delta`` in place, from the detached lower output; none takes effect
        when ``ok`` (0-d bool) is False. Class updates skipped for a non-finite gradient are added to
        ``skipped`` (0-d int64 device tensor). ``plan``: the labels' ``_common.label_plan``, or None."""
        h = h.detach()
        extras = tuple(e.detach() if isinstance(e, torch.Tensor) else e for e in extras)
        head = self._head(head, h, delta)
        if head is not None:
            return self._head_pgd(delta, h, labels, head, ok, skipped, plan)
        with frozen_batchnorm_stats(self.norm_scope), torch.enable_grad():
            for t in range(self.steps):
                live = delta.detach().requires_grad_(True)
                logits = upper(self.apply(h, labels, live, plan), extras)
                loss = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, live)
                if t == 0:  # the policy reads the first step's logits, whose statistics are summed with grad
                    direction, eps = self._resolve(logits, labels, delta, grad)
                else:
                    all_reduce_sum(grad, "class gradient")
                self._pgd_step(delta, grad, direction, eps, ok, skipped)

    def _head_pgd(self, delta, h, labels, head: nn.Linear, ok: torch.Tensor | None, skipped: torch.Tensor,
                  plan: torch.Tensor | None) -> None:
        """The fused head path; its loop has no hook between steps, so ``run_head_pgd_``'s guard applies to
        its result: a class whose new delta is not finite (counted once for the T steps), or every class
        when ``ok`` is False, gets its previous delta back. On the reference backend the default policy (confidence
        direction, fixed radius) is applied by ``head_pgd_`` from its first step's softmax (fewer ops); the
        kernel backends, and any other policy, read the first-step logits here (on a GPU the fused
        statistics and policy kernels take 2 launches where ``loop.py``'s rule in torch ops takes ~20)."""
        flat = h if h.dim() == 2 else h.flatten(1)
        eager = not torch.compiler.is_compiling()  # the bound call is eager state: a graph would guard on it
        settings = (self.steps, self.norm, self.mode)  # in the bound call's arguments
        if eager and self._bound_head is not None:  # the host call of an earlier batch, repeated on this one
            bound, eps, bound_settings = self._bound_head
            if bound_settings == settings and bound.repeat(
                    (head.weight, head.bias, delta, self._step_sizes, eps, None, ok, skipped), flat, labels):
                return
            self._bound_head = None
        flat_delta = delta if delta.dim() == 2 else delta.view(delta.shape[0], -1)
        weight = head.weight.detach()
        bias = None if head.bias is None else head.bias.detach()
        eps = self.policy.head_radius(delta) if self._resolved_backend == "reference" else None
        fixed = eps is not None  # the policy's radii, made once (never replaced), and the confidence direction
        direction = "confidence"
        if eps is None:
            logits = None
            if self.policy.needs_stats:
                logits = F.linear(self.apply(flat, labels, flat_delta, plan), weight, bias)
            direction, eps = self._resolve(logits, labels, delta)
        bound = run_head_pgd_(flat, labels, weight, bias, flat_delta, self.steps, self._step_sizes, eps, direction,
                              self.norm, self.mode, self._resolved_backend, plan, ok, skipped)
        if eager and fixed and bound is not None:
            # bound to what this method presents next time (the parameters, not their detach())
            keyed = bound.keyed((head.weight, head.bias, delta, self._step_sizes, eps, None, ok, skipped))
            self._bound_head = None if keyed is None else (keyed, eps, settings)

    def _resolve(self, logits, labels, delta, grad=None):
        """The policy's ``(direction, eps)`` for a T-step run, from the first step's logits; ``grad``, that
        step's class gradient (None: none here), is summed over the processes in the statistics' all-reduce."""
        stats = self._batch_stats(logits, labels, None, summed=False) if self.policy.needs_stats else None
        all_reduce_sum_together({"class gradient": grad, "statistics": stats})
        return self.policy.step(stats, delta, observe=False, clear=False, backend=self._resolved_backend)

    def _batch_stats(self, logits, labels, ok, log_probs=None, into=None, summed=True) -> torch.Tensor:
        """The ``(3, K)`` class statistics of ``logits`` (``log_probs``: their log-softmax in compute
        precision, if known), zero when ``ok`` is False (None: known True): summed over the processes
        (``summed``; else this process's, which the caller sums), or if ``into`` is given, this process's
        added to it (one kernel; the single-pass step sums them with its class gradient, ``after_backward``)."""
        if log_probs is None:
            log_probs = logits.detach().to(compute_dtype(logits.dtype)).log_softmax(dim=1)
        log_probs = log_probs.detach()
        if into is not None:
            if torch.compiler.is_compiling():  # the bound call is eager state: a graph would guard on it
                class_stats_(into, log_probs, labels, ok, True, self._resolved_backend)
            # the single-pass step adds into the same statistics every step: its host call is repeated
            elif self._bound_stats is None or not self._bound_stats.repeat((into, ok), log_probs, labels):
                self._bound_stats = class_stats_(into, log_probs, labels, ok, True, self._resolved_backend)
            return into
        stats = log_probs.new_empty((3, self.num_classes))
        class_stats_(stats, log_probs, labels, ok, False, self._resolved_backend)
        return all_reduce_sum(stats, "class statistics") if summed else stats

    # ----- one training step -----------------------------------------------------------------------
    def training_delta(self, h, extras, labels, ok, upper, head=None, plan=None) -> torch.Tensor:
        """The delta the training forward uses: after T PGD steps (detached), or in single-pass mode
        the carried delta through the leaf that collects the class gradient of the summed loss.
        ``labels`` are in range; ``ok`` (0-d bool) is False for a batch whose labels were not, and then
        delta keeps its value (None: the labels are known good). ``plan``: the step's
        ``_common.label_plan`` of ``labels``, or None."""
        perturbation = self._ensure(h)
        if self.steps == 0:
            if not torch.is_grad_enabled():
                return perturbation.delta.detach()
            self._pending = True
            # the module's leaf sharing delta's storage (ClassPerturbation.live_delta, which follows delta to new
            # memory); training backwards sum into its .grad; ``apply`` scales its gradient
            return perturbation.live_delta()
        delta, kept = perturbation.delta, None
        if self.init == "fresh":
            in_order = order_ok(delta.device)
            with torch.no_grad():
                if in_order is not None:  # restored below if this step's all-reduces find the ranks out of step
                    kept = delta.clone()
                if ok is None:
                    delta.zero_()
                else:
                    delta.masked_fill_(ok, 0.0)
        self.run_pgd(delta, h, extras, labels, upper, self._skipped, head, ok, plan)
        if kept is not None:
            with torch.no_grad():
                delta.copy_(torch.where(in_order, delta, kept))
        return delta.detach()

    def preview_delta(self, h, extras, labels, upper, head=None) -> torch.Tensor:
        """The delta this batch would be trained with, computed on a copy (no state changes: before the
        first training batch the delta made for it is dropped again)."""
        created = self.perturbation is None
        delta = self._ensure(h).delta.detach().clone()
        try:
            if self.steps > 0:
                if self.init == "fresh":
                    delta.zero_()
                self.run_pgd(delta, h, extras, labels, upper, torch.zeros_like(self._skipped), head)
        finally:
            if created:
                self.perturbation, self._skipped = None, None
        return delta

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None,
                log_probs: torch.Tensor | None = None) -> None:
        """Read the training forward's (perturbed) logits: class statistics for the single-pass step and
        the "loss_trend" policy (zero for a batch whose ``ok`` is False, so it changes neither; ``ok``
        None: labels known good). ``log_probs``: their log-softmax in compute precision, if already
        known. In single-pass mode the statistics of the forwards before one ``after_backward`` are
        summed (in place, one kernel) and used there (summed over the processes there)."""
        single_pass = self.steps == 0 and self._pending
        if not (single_pass and self.policy.needs_stats or self.policy.tracks_loss):
            return
        if not single_pass:  # T-step mode: the trend state takes this batch's statistics now
            stats = self._batch_stats(logits, labels, ok, log_probs)
            self.policy.step(stats, stats, observe=True, clear=False, backend=self._resolved_backend)
            return
        self._batch_stats(logits, labels, ok, log_probs, into=self.single_pass_stats(logits))

    def single_pass_stats(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The ``(3, K)`` statistics the single-pass step's forwards add into (in ``logits``' compute dtype and
        device), or None when the policy reads none."""
        if not (self.policy.needs_stats or self.policy.tracks_loss):
            return None
        dtype = compute_dtype(logits.dtype)
        if self._stats is None or self._stats.dtype != dtype or self._stats.device != logits.device:
            self._stats = torch.zeros((3, self.num_classes), dtype=dtype, device=logits.device)
        return self._stats

    def class_space_ready(self, h: torch.Tensor, head: nn.Linear) -> bool:
        """Whether ``head_loss`` serves this site's single-pass training forward on the batch ``h`` feeding the
        classifier ``head``; the delta is made for a first batch, as ``training_delta`` would make it, nothing
        else changes. (T steps gain nothing measurable from it: their training forward perturbs a constant.)"""
        if self.steps or not head_loss.serves(h, head, self.num_classes, self.mode):
            return False
        return head_loss.serves_delta(self._ensure(h).delta, h)

    def after_backward(self) -> int:
        """Single pass: one PGD step from the class gradient the training backwards since the last call
        summed on the leaf, with the policy's direction and radius from the statistics they summed (the
        policy clears them). Returns the number of PGD steps taken (0 or 1)."""
        if not self._pending:
            return 0
        leaf, reads_stats = self.perturbation.live_delta(), self.policy.needs_stats or self.policy.tracks_loss
        grad, self._pending, leaf.grad = leaf.grad, False, None
        stats = self._stats if reads_stats else None  # this process's (observe)
        if grad is None:
            if stats is not None:
                stats.zero_()
            return 0
        # the gradient of the summed CE over the global batch (module docstring) and the statistics of that
        # batch: one all-reduce for both
        all_reduce_sum_together({"class gradient": grad, "statistics": stats})
        # a class whose gradient overflowed (a bad sample, an AMP step the GradScaler will skip) keeps its delta
        self.policy.step_pgd_(stats, self.perturbation.delta, grad, self._step_sizes, self.norm, self._all_ok,
                              self._skipped, self._resolved_backend)
        return 1
