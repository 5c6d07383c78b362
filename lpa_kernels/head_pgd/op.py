"""Public ``head_pgd_``: T PGD steps on delta when the upper network is a linear classifier.

The fast backends run the whole loop without autograd through the in-place custom op
``lpa_kernels::head_pgd_``, whose launcher ``head_pgd`` (``backends.HeadPGDLaunchers``) lives in
``triton_kernels.py`` and ``cuda_kernels.py``. It is a no-grad optimisation loop, so the op has no
autograd formula. The reference backend runs the same loop on PyTorch ops (``torch_kernels.py``);
``naive.py``, the autograd loop, is the definition every backend is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch

from lpa_kernels import _checks, _host_ext, backend as _backend
from lpa_kernels._common import update_in_place
from lpa_kernels.head_pgd import torch_kernels
from lpa_kernels.head_pgd.backends import launchers
from lpa_kernels.step_update.plan import call_plan


@torch.library.custom_op("lpa_kernels::head_pgd_", mutates_args=("delta", "skipped"))
def _head_pgd_op(
    h: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], delta: torch.Tensor,
    steps: int, step_size: torch.Tensor, eps: torch.Tensor, direction: Optional[torch.Tensor], norm: str,
    perturb_mode: str, backend: str, plan: Optional[torch.Tensor] = None, ok: Optional[torch.Tensor] = None,
    skipped: Optional[torch.Tensor] = None,
) -> None:
    """``direction`` None means LPL's confidence rule; ``plan`` the labels' ``_common.label_plan`` or None;
    with ``skipped``, the training step's guard (``loop.guarded``).
    (An argument named ``mode`` would clash with torch's dispatch-mode redirection under AOT dispatch.)"""
    launchers(backend).head_pgd(h, labels, weight, bias, delta, steps, step_size, eps, direction, norm, perturb_mode,
                                plan, ok, skipped)


@_head_pgd_op.register_fake
def _(h, labels, weight, bias, delta, steps, step_size, eps, direction, norm, perturb_mode, backend, plan=None, ok=None,
      skipped=None):
    return None


def head_pgd_(
    h: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    delta: torch.Tensor,
    steps: int,
    step_size: float | torch.Tensor,
    eps: float | torch.Tensor,
    direction: float | torch.Tensor | str = 1.0,
    norm: str = "l2",
    mode: str = "add",
    backend: str = "auto",
) -> torch.Tensor:
    """``steps`` PGD steps on ``delta (K, D)`` in place, for ``logits = perturb(h, y, delta) @ W.T + b``
    with summed cross-entropy. ``h (B, D)``, ``weight (K, D)``, ``bias (K,)`` or None. ``direction``
    is a float, a ``(K,)`` tensor or ``"confidence"`` (LPL's rule from the first step's softmax).
    ``delta`` may have another float dtype than ``h``; the perturbed activations are rounded to h's
    dtype as ``perturb`` does, delta keeps its own (the rule in ``lpa_kernels._checks``). Returns ``delta``."""
    _checks.check_float("h", h)
    _checks.check_float("weight", weight)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_choice("mode", mode, _checks.MODES)
    _checks.check_count("steps", steps, 0)
    confidence = isinstance(direction, str)
    if confidence:
        _checks.check_choice("direction", direction, ("confidence",))
    step, radius, sign = _checks.check_pgd_hyperparameters(delta, step_size, eps, 1.0 if confidence else direction, norm)
    if h.dim() != 2:
        raise ValueError(f"h must have shape (B, D), got {tuple(h.shape)}")
    k, d = delta.shape[0], h.shape[1]
    if weight.dim() != 2 or tuple(weight.shape) != (k, d):
        raise ValueError(f"weight must have shape (K, D) = ({k}, {d}) to match delta and h, got {tuple(weight.shape)}")
    if tuple(delta.shape) != (k, d):
        raise ValueError(f"delta must have shape (K, D) = ({k}, {d}), got {tuple(delta.shape)}")
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias must have shape ({k},) or be None, got {tuple(bias.shape)}")
    device = _checks.check_same_device(h=h, labels=labels, weight=weight, bias=bias, delta=delta)
    _checks.check_labels(labels, h.shape[0], k)
    _checks.check_in_place_target(delta, h=h, labels=labels, weight=weight, bias=bias, step_size=step_size, eps=eps,
                                  direction=direction)
    backend = _backend.resolve(backend, device)
    run_head_pgd_(h, labels, weight, bias, delta, steps, step, radius, "confidence" if confidence else sign, norm, mode,
                  backend)
    return delta


def run_head_pgd_(h, labels, weight, bias, delta, steps: int, step, radius, direction, norm: str, mode: str,
                  backend: str, plan: torch.Tensor | None = None, ok: torch.Tensor | None = None,
                  skipped: torch.Tensor | None = None) -> _host_ext.BoundCall | None:
    """``head_pgd_`` without validation (no device sync), for callers whose arguments are valid by
    construction (the LPA training machinery, whose labels are clamped into range): ``step``, ``radius``
    (> 0) and ``direction`` ``(K,)`` tensors as ``_common.per_class`` makes them (or ``"confidence"``);
    ``backend`` resolved; ``plan`` the labels' ``_common.label_plan`` (the training step's) or None. With
    ``skipped`` (0-d int64), the training step's guard on the result (``loop.guarded``: non-finite rows, or
    all when ``ok`` is False, keep their previous value; the host kernel and the one-launch class space do
    it in the same launch). Returns the reference backend's host kernel call bound to its tensors
    (``_host_ext.BoundCall``, which the training step repeats), else None."""
    args = [t.detach().contiguous() for t in (h, labels, weight)]
    bias = None if bias is None else bias.detach().contiguous()
    direction = None if isinstance(direction, str) else direction  # None: the loop applies the confidence rule
    if backend == "reference":  # the loop's algebra in torch ops (naive.py, autograd per step, is the definition)
        bound = None

        def run(d):
            nonlocal bound
            bound = torch_kernels.head_pgd(*args, bias, d, steps, step, radius, direction, norm, mode, ok, skipped)

        update_in_place(delta, run)
        return bound
    if plan is None and steps > 0:  # one plan of the labels for all the steps (also when steps == 1, so
        plan = call_plan(args[1], delta.shape[0], backend)  # that a call's set-up is the same whatever its steps)
    update_in_place(delta, lambda d: _head_pgd_op(*args, bias, d, steps, step, radius, direction, norm, mode, backend,
                                                  plan, ok, skipped))
    return None

