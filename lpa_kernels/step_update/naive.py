"""Reference definitions of the fused per-step ops of the LPA training step (``op.py`` runs them on the
reference backend; the Triton and CUDA C++ kernels compute the same, up to the order of summation).

``checked_label_plan_``: one training batch's labels ``(B,)`` checked on the device (no host read):
``safe`` clamped into ``[0, K)`` (what every kernel of the step reads), ``loss_labels`` (``safe``, or
``IGNORE_LABEL`` everywhere for a bad batch: its mean cross-entropy is then NaN with a zero gradient),
``ok`` (0-d bool) and the ``(min, max)`` of a bad batch recorded into ``bad_range (2,)`` in place;
optionally the ``_common.label_plan`` of ``safe``.

``class_stats_``: the ``(3, K)`` class statistics (sample counts, sums of the true-class probability,
sums of the cross-entropy) of one batch from its log-softmax, zero for a batch whose ``ok`` is False,
written into or added to ``stats`` (micro-batches before one update sum, as one large batch would).

``policy_``: from ``stats``, the built-in policies (``lpa.policies``) in one pass: the per-class means
(a class with non-finite sums counts as absent), the "loss_trend" state update (``observe``), the
``(K,)`` direction (a fixed tensor, the confidence rule or the loss trend) and radius (a fixed tensor,
"confidence" or "confidence_linear", at least ``min_radius``), and optionally ``stats`` cleared.
"""

from __future__ import annotations

import torch

from lpa_kernels._common import label_plan

IGNORE_LABEL = -100  # F.cross_entropy's and F.nll_loss's default ignore_index

# policy_'s choices (also the kernels' codes)
DIRECTIONS = {"fixed": 0, "confidence": 1, "loss_trend": 2}
RADII = {"fixed": 0, "confidence": 1, "confidence_linear": 2}
# policy_'s scalar parameters (the kernels take them as a float64 (4,) tensor)
PARAMS = ("eps", "delta_eps", "min_radius", "momentum")


def checked_label_plan_(labels: torch.Tensor, num_classes: int, bad_range: torch.Tensor, with_plan: bool = True):
    """``(safe (B,) int64, loss_labels (B,) int64, ok () bool, plan or None)``; ``bad_range (2,) int64``
    takes the labels' ``(min, max)`` when they are not all in ``[0, num_classes)`` (module docstring)."""
    labels = labels.to(torch.int64)
    safe = labels.clamp(0, num_classes - 1)
    ok = (safe == labels).all()  # True for an empty batch
    if labels.numel():
        torch.where(ok, bad_range, torch.stack(torch.aminmax(labels)), out=bad_range)
    loss_labels = torch.where(ok, safe, IGNORE_LABEL)
    return safe, loss_labels, ok, label_plan(safe, num_classes) if with_plan else None


def class_stats_(stats: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None,
                 accumulate: bool) -> torch.Tensor:
    """``stats (3, K)`` (float32, or float64) set to, or with ``accumulate`` increased by, the class
    statistics of ``log_probs (B, K)`` at ``labels (B,)`` (in range), gated by ``ok`` (None: known True)."""
    log_p_true = log_probs.detach().gather(1, labels.long()[:, None]).squeeze(1).to(stats.dtype)
    rows = torch.stack([torch.ones_like(log_p_true), log_p_true.exp(), -log_p_true])
    if ok is not None:
        rows = torch.where(ok, rows, 0.0)
    if not accumulate:
        stats.zero_()
    return stats.index_add_(1, labels, rows)


def class_means(stats: torch.Tensor):
    """``(present (K,) bool, finite (K,) bool, mean p_true (K,), mean CE (K,))``: a class whose sums are
    not finite counts as absent and has means 0 (its NaN reaches no other class)."""
    counts, p_sum, ce_sum = stats
    finite = torch.isfinite(p_sum) & torch.isfinite(ce_sum)
    samples = counts.clamp_min(1)
    return ((counts > 0) & finite, finite, torch.where(finite, p_sum / samples, 0.0),
            torch.where(finite, ce_sum / samples, 0.0))


def observe_trend_(stats: torch.Tensor, loss_ema: torch.Tensor, fall_ema: torch.Tensor, skipped: torch.Tensor,
                   momentum: float) -> None:
    """The "loss_trend" state update (``lpa.policy.Policy.observe``) in place: ``loss_ema``, ``fall_ema``
    (K,) float64, ``skipped`` () int64 (non-finite class statistics left out)."""
    present, finite, _, loss = class_means(stats)
    loss = loss.double()
    skipped += ((stats[0] > 0) & ~finite).sum()
    first = present & loss_ema.isnan()
    seen = present & ~first
    updated = momentum * loss_ema + (1 - momentum) * loss
    fall_ema.copy_(torch.where(seen, momentum * fall_ema + (1 - momentum) * (loss_ema - updated), fall_ema))
    loss_ema.copy_(torch.where(seen, updated, torch.where(first, loss, loss_ema)))


def trend_direction(loss_ema: torch.Tensor, fall_ema: torch.Tensor) -> torch.Tensor:
    """``(K,)`` float64: ``sign(mean fall - fall_c)`` over the classes seen so far, 0 for the others."""
    seen = ~loss_ema.isnan()
    return torch.where(seen, torch.sign(fall_ema.sum() / seen.sum() - fall_ema), 0.0)


def _scaled(size: torch.Tensor) -> torch.Tensor:
    """``size / max(size)``, 0 when every entry is 0 (the policies' ``clamp_min(tiny)`` of the largest,
    the same for every largest gap above the smallest normal number)."""
    largest = size.amax() if size.numel() else size.new_zeros(())
    return torch.where(largest > 0, size / largest, 0.0)


def policy_(stats: torch.Tensor, fixed_direction: torch.Tensor | None, fixed_eps: torch.Tensor | None,
            loss_ema: torch.Tensor | None, fall_ema: torch.Tensor | None, skipped: torch.Tensor | None,
            params: tuple[float, float, float, float], direction: str, radius: str, observe: bool, clear: bool,
            dtype: torch.dtype):
    """``(direction (K,), eps (K,))`` in ``dtype`` from ``stats (3, K)`` (module docstring), ``params``
    the ``PARAMS`` values. With ``observe`` the trend state (``loss_ema``, ``fall_ema``, ``skipped``) is
    updated first, in place; ``clear`` zeroes ``stats`` at the end."""
    eps, delta_eps, min_radius, momentum = params
    if observe:
        observe_trend_(stats, loss_ema, fall_ema, skipped, momentum)
    if direction == "confidence" or radius != "fixed":  # the confidence gap thr - p_c
        present, _, p_mean, _ = class_means(stats.to(dtype))
        p_c = torch.where(present, p_mean, 0.0)  # 0 for a class absent with finite sums too
        thr = p_c.sum() / present.sum().clamp_min(1)
        gap = torch.where(present, thr - p_c, 0.0)
    if direction == "fixed":
        chosen = fixed_direction
    elif direction == "confidence":
        chosen = torch.sign(gap)
    else:
        chosen = trend_direction(loss_ema, fall_ema).to(dtype)
    if radius == "fixed":
        radii = fixed_eps
    elif radius == "confidence":
        bonus = _scaled(gap.clamp_min(0)) + _scaled((-gap).clamp_min(0))  # each class on one side of thr
        radii = (eps * (1 + delta_eps * bonus)).clamp_min(min_radius)
    else:
        radii = (eps * _scaled(gap.abs())).clamp_min(min_radius)
    if clear:
        stats.zero_()
    return chosen, radii
