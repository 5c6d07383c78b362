"""``ClassSite``: one per-class perturbation learned by PGD, at the LPA layer or on the logits (LPL).

T-step mode (``steps >= 1``): the lower network's output ``h`` is given once; each step re-runs only
``upper`` on ``perturb(h.detach(), y, delta)``, takes the class-summed gradient of the summed
cross-entropy and applies ``pgd_step_``; the training forward then uses ``delta.detach()``. When
``upper`` is exactly the final ``nn.Linear`` the whole loop is one ``head_pgd_`` call (no autograd).

Single-pass mode (``steps == 0``, delta carried): the training forward perturbs with a leaf view of
delta; its backward leaves ``grad_delta`` there and ``after_backward`` applies one ``pgd_step_``.

Validation: the caller range-checks the batch's labels once per training step (``_checks.check_labels``:
the step's one device sync, reading the labels' min and max); the site then calls the ops' internal entry
points, which skip that check and the radius check (the policy's radii are positive by construction), so
no other sync happens (except in the fused ``head_pgd_`` path of T-step mode, which validates its arguments).

Finiteness guard (one bad sample never ends training): on every path that updates delta (T-step fresh
and carried, autograd and head, single pass; the LPL site alike), a class whose gradient, or whose new
delta on the fused head path, is not finite keeps its previous delta for that step. It is done on the
device (``torch.where``, no host sync), and the skipped class updates are counted (``skipped_updates``,
reported by ``Method.stats()``). The policies treat a class with non-finite statistics as absent from the
batch (``policy._means``). The training loss of such a batch is still non-finite: skip that optimizer
step, as ``GradScaler`` does.

Class gradient, defined so that data-parallel training equals one process on the whole batch: the
gradient of the cross-entropy SUMMED over the global batch. T-step mode differentiates the summed loss
directly; single-pass mode multiplies the gradient of the local mean loss by the local batch size.
Under ``torch.distributed`` (world size > 1) it is all-reduced (summed) before every step, and the
policies read statistics summed over all processes, so every rank keeps the same delta.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lpa_kernels import backend as _backend, head_pgd_
from lpa_kernels._common import compute_dtype, per_class
from lpa_kernels.lpa.policy import Policy, all_reduce_sum, class_stats, class_stats_from_log_probs, world_size
from lpa_kernels.nn.perturbation import ClassPerturbation
from lpa_kernels.perturb.op import run_perturb
from lpa_kernels.pgd.op import run_pgd_step_


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module):
    """Extra forwards (PGD steps, probes) leave BatchNorm running statistics as they were.

    Only the modules that ran inside the block are restored (a forward hook marks them, no device
    sync): writing to the others would bump the version of buffers the pending training graph saved.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = {m: [b.clone() for b in m.buffers()] for m in norms}
    ran = set()
    hooks = [m.register_forward_hook(lambda m, *_: ran.add(m)) for m in norms]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for m in ran:
                for b, s in zip(m.buffers(), saved[m]):
                    b.copy_(s)


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: whether every entry of class c's row of ``t (K, *P)`` is finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


def per_row(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(K,)`` mask shaped to broadcast over ``like (K, *P)``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


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
        self._pending = None  # single pass: (live delta, local batch size, class stats or None)

    @property
    def delta(self) -> torch.Tensor | None:
        return None if self.perturbation is None else self.perturbation.delta

    def _ensure(self, h: torch.Tensor) -> ClassPerturbation:
        if self.perturbation is None:
            dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
            self._create(delta_shape_for(tuple(h.shape[1:]), self.layout), dtype, h.device)
        return self.perturbation

    def _create(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.perturbation = ClassPerturbation(
            self.num_classes, shape, mode=self.mode, eps=self.policy.eps, step_size=self.step_size,
            norm=self.norm, backend=self.backend, dtype=dtype, device=device)
        # what every PGD step passes to the op, made once
        self._step_sizes = per_class(self.step_size, self.num_classes, self.perturbation.delta)
        self._resolved_backend = _backend.resolve(self.backend, device)
        # the count survives a reload of delta onto another device
        self._skipped = torch.zeros((), dtype=torch.int64, device=device) if self._skipped is None else self._skipped.to(device)

    @property
    def skipped_updates(self) -> int:
        """Class updates skipped so far because the class's gradient was not finite (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    def load(self, delta: torch.Tensor) -> None:
        """Take ``delta (K, *P)`` as the carried perturbation (from a checkpoint)."""
        if self.perturbation is None or self.perturbation.delta.shape != delta.shape:
            self._create(tuple(delta.shape[1:]), delta.dtype, delta.device)
        with torch.no_grad():
            self.perturbation.delta.copy_(delta)

    def apply(self, h: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``perturb(h, labels, delta)``; ``labels`` range-checked by the caller (see the module docstring)."""
        return run_perturb(h, labels, delta, self.mode, self.backend)

    def _pgd_step(self, delta: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``pgd_step_`` with the policy's ``(K,)`` direction and radii (positive by construction), in which a
        class whose gradient is not finite keeps its delta (a zero gradient leaves a class untouched).
        Returns the number of such classes, as a device tensor (no sync)."""
        finite = finite_rows(grad)
        grad = torch.where(per_row(finite, grad), grad, 0.0)
        run_pgd_step_(delta, grad, self._step_sizes, eps, direction, self.norm, self._resolved_backend)
        return (~finite).sum()

    # ----- T-step PGD -----------------------------------------------------------------------------
    def _head(self, head: nn.Linear | None, h: torch.Tensor, delta: torch.Tensor) -> nn.Linear | None:
        """The classifier for the fused path, if it applies (and the config allows it)."""
        if self.head_choice == "never" or self.steps == 0:
            return None
        fits = (head is not None and head.out_features == self.num_classes and world_size() == 1
                and math.prod(h.shape[1:]) == head.in_features == delta[0].numel())
        if self.head_choice == "always" and not fits:
            raise ValueError("head='always' needs the layer to feed the final nn.Linear(D, K) classifier directly, "
                             "a full per-class delta of D values, steps >= 1 and a single process")
        return head if fits else None

    def run_pgd(self, delta: torch.Tensor, h: torch.Tensor, extras: tuple, labels: torch.Tensor,
                upper: Callable, head: nn.Linear | None = None) -> torch.Tensor:
        """``self.steps`` PGD steps on ``delta`` in place, from the detached lower output. Returns the
        number of class updates skipped for a non-finite gradient (a device tensor)."""
        h = h.detach()
        extras = tuple(e.detach() if isinstance(e, torch.Tensor) else e for e in extras)
        head = self._head(head, h, delta)
        if head is not None:
            return self._head_pgd(delta, h, labels, head)
        skipped = torch.zeros((), dtype=torch.int64, device=delta.device)
        with frozen_batchnorm_stats(self.norm_scope), torch.enable_grad():
            for t in range(self.steps):
                live = delta.detach().requires_grad_(True)
                logits = upper(self.apply(h, labels, live), extras)
                if t == 0:
                    direction, eps = self._resolve(logits, labels, delta)
                loss = F.cross_entropy(logits.to(compute_dtype(logits.dtype)), labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, live)
                skipped += self._pgd_step(delta, all_reduce_sum(grad), direction, eps)
        return skipped

    def _head_pgd(self, delta, h, labels, head: nn.Linear) -> torch.Tensor:
        """The fused head path; its loop has no hook between steps, so the guard applies to its result: a
        class whose new delta is not finite gets its previous delta back (counted once for the T steps)."""
        flat, flat_delta = h.flatten(1), delta.view(delta.shape[0], -1)
        weight = head.weight.detach()
        bias = None if head.bias is None else head.bias.detach()
        logits = None
        if self.policy.needs_stats:
            logits = F.linear(self.apply(flat, labels, flat_delta), weight, bias)
        direction, eps = self._resolve(logits, labels, delta)
        previous = flat_delta.clone()
        head_pgd_(flat, labels, weight, bias, flat_delta, self.steps, self.step_size, eps, direction,
                  self.norm, self.mode, backend=self.backend)
        finite = finite_rows(flat_delta)
        flat_delta.copy_(torch.where(per_row(finite, flat_delta), flat_delta, previous))
        return (~finite).sum()

    def _resolve(self, logits, labels, delta):
        stats = class_stats(logits, labels, self.num_classes) if self.policy.needs_stats else None
        return self.policy.resolve(stats, delta)

    # ----- one training step -----------------------------------------------------------------------
    def training_delta(self, h, extras, labels, upper, head=None) -> torch.Tensor:
        """The delta the training forward uses: after T PGD steps (detached), or in single-pass mode
        the carried delta as a leaf that collects the class gradient."""
        perturbation = self._ensure(h)
        if self.steps == 0:  # a leaf sharing delta's storage, which the training backward gives a gradient
            live = perturbation.delta.detach().requires_grad_(torch.is_grad_enabled())
            self._pending = (live, h.shape[0], None)
            return live
        if self.init == "fresh":
            perturbation.reset()
        self._skipped += self.run_pgd(perturbation.delta, h, extras, labels, upper, head)
        return perturbation.delta.detach()

    def preview_delta(self, h, extras, labels, upper, head=None) -> torch.Tensor:
        """The delta this batch would be trained with, computed on a copy (no state changes)."""
        delta = self._ensure(h).delta.detach().clone()
        if self.steps == 0:
            return delta
        if self.init == "fresh":
            delta.zero_()
        self.run_pgd(delta, h, extras, labels, upper, head)
        return delta

    def observe(self, logits: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None) -> None:
        """Read the training forward's (perturbed) logits: class statistics for the single-pass step and
        the "loss_trend" policy. ``log_probs``: their log-softmax in compute precision, if already known."""
        single_pass = self.steps == 0 and self.policy.needs_stats and self._pending is not None
        if not (single_pass or self.policy.tracks_loss):
            return
        if log_probs is None:
            stats = class_stats(logits, labels, self.num_classes)
        else:
            stats = class_stats_from_log_probs(log_probs, labels, self.num_classes)
        self.policy.observe(stats)
        if single_pass:
            self._pending = self._pending[:2] + (stats,)

    def after_backward(self) -> int:
        """Single pass: one PGD step from the gradient the training backward left on delta. Returns the
        number of PGD steps taken (0 or 1)."""
        if self._pending is None:
            return 0
        live, batch, stats = self._pending
        self._pending = None
        if live.grad is None:
            return 0
        grad = all_reduce_sum(live.grad * batch)  # gradient of the summed CE (see the module docstring)
        direction, eps = self.policy.resolve(stats, grad)
        # a class whose gradient overflowed (a bad sample, an AMP step the GradScaler will skip) keeps its delta
        self._skipped += self._pgd_step(self.perturbation.delta, grad, direction, eps)
        return 1
