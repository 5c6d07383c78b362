"""Entry points of the fused per-step ops for the LPA training step, and their custom ops (so that
``torch.compile`` sees one opaque op per kernel). Internal, like the ``run_*`` entries of the public ops:
the arguments are valid by construction (``lpa.labels``, ``lpa.policy``, ``lpa.site`` make them), and
``backend`` is resolved. On the reference backend they are ``naive.py`` itself, or on CPU tensors its host
C++ kernels (``_host_ext``) for the statistics and the policy."""

from __future__ import annotations

from typing import Optional

import torch

from lpa_kernels import _host_ext
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from lpa_kernels.step_update import naive
from lpa_kernels.step_update.backends import launchers


@torch.library.custom_op("lpa_kernels::class_stats_", mutates_args=("stats",))
def _class_stats_op(stats: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor,
                    accumulate: bool, backend: str) -> None:
    launchers(backend).class_stats(stats, log_probs, labels, ok, accumulate)


@_class_stats_op.register_fake
def _(stats, log_probs, labels, ok, accumulate, backend):
    return None


@torch.library.custom_op("lpa_kernels::policy_", mutates_args=("stats", "loss_ema", "fall_ema", "skipped"))
def _policy_op(stats: torch.Tensor, fixed_direction: Optional[torch.Tensor], fixed_eps: Optional[torch.Tensor],
               loss_ema: Optional[torch.Tensor], fall_ema: Optional[torch.Tensor], skipped: Optional[torch.Tensor],
               params: torch.Tensor, direction: str, radius: str, observe: bool, clear: bool, dtype: torch.dtype,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers(backend).policy(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params,
                                     direction, radius, observe, clear, dtype)


@_policy_op.register_fake
def _(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction, radius, observe, clear,
      dtype, backend):
    K = stats.shape[1]
    return stats.new_empty((K,), dtype=dtype), stats.new_empty((K,), dtype=dtype)


def class_stats_(stats: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None,
                 accumulate: bool, backend: str) -> _host_ext.BoundCall | None:
    """``naive.class_stats_``: ``stats (3, K)`` set to or increased by the batch's class statistics, in place.
    ``ok`` None: the labels are known good (checked on the host). Returns the host C++ call bound to ``stats``
    and ``ok`` where one ran (the reference backend's CPU tensors: a later batch may repeat it), else None."""
    if backend == "reference":
        bound = _host_ext.class_stats(stats, log_probs, labels, ok, accumulate)
        if bound is None:
            naive.class_stats_(stats, log_probs, labels, ok, accumulate)
        return bound
    if ok is None:
        ok = torch.ones((), dtype=torch.bool, device=stats.device)
    _class_stats_op(stats, log_probs.contiguous(), labels.contiguous(), ok, accumulate, backend)
    return None


def policy_(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction: str, radius: str,
            observe: bool, clear: bool, dtype: torch.dtype, backend: str):
    """``naive.policy_``: ``(direction (K,), eps (K,))`` in ``dtype``, the trend state updated in place.
    ``params``: ``naive.PARAMS``, floats on the reference backend, a float64 tensor on the others."""
    if backend == "reference":
        served = _host_ext.policy(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction,
                                  radius, observe, clear, dtype)
        if served is not None:
            return served
        return naive.policy_(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction,
                             radius, observe, clear, dtype)
    return _policy_op(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, skipped, params, direction, radius,
                      observe, clear, dtype, backend)


def policy_pgd_step_(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped, params, direction: str,
                     radius: str, observe: bool, clear: bool, delta, grad, step, norm: str, ok: torch.Tensor,
                     skipped: torch.Tensor, backend: str) -> _host_ext.BoundCall | None:
    """``policy_`` (``stat_skipped``: its ``skipped``; ``dtype`` delta's), then the guarded PGD step of
    ``delta (K, *P)`` from ``grad`` with the direction and radii it gives (``pgd.op.run_guarded_pgd_step_``):
    the single-pass step's update. One host C++ call on the reference backend's CPU tensors, returned bound
    to these tensors (``_host_ext.BoundCall``: the next step may repeat it with its gradient); else None."""
    if backend == "reference":
        bound = _host_ext.policy_pgd_step(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped,
                                          params, direction, radius, observe, clear, delta, grad, step, norm, ok,
                                          skipped)
        if bound is not None:
            return bound
    chosen, radii = policy_(stats, fixed_direction, fixed_eps, loss_ema, fall_ema, stat_skipped, params, direction,
                            radius, observe, clear, delta.dtype, backend)
    run_guarded_pgd_step_(delta, grad, step, radii, chosen, norm, ok, skipped, backend)
    return None
