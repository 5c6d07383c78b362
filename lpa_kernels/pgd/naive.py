"""The definition of ``pgd_step_`` and ``class_grad_pgd_step_`` in plain PyTorch (the reference backend).

``delta (K, *P)``, ``grad (K, *P)``; ``step_size``, ``eps``, ``direction`` are ``(K,)`` tensors.
- ``linf``: ``delta_c <- clamp(delta_c + step_c * dir_c * sign(g_c), -eps_c, eps_c)``
- ``l2``:   ``delta_c <- delta_c + step_c * dir_c * g_c / (||g_c|| + 1e-12)``, then scaled back onto
  ``||delta_c|| <= eps_c`` when outside it.
A class whose gradient is exactly zero everywhere (absent from the batch) keeps its delta unchanged,
projection included; a NaN gradient is not zero and propagates.

L2 details every backend follows (``pgd_step_``'s docstring states them for users):
- the direction is computed from ``g_c`` divided by its largest ``|entry|`` (the same unit vector, but
  ``||g_c||^2`` cannot overflow); a row holding +-Inf entries steps along the sign pattern of those
  entries (finite entries count 0), the limit of ``g / ||g||`` as they grow: finite, not NaN;
- the projection targets ``eps_c - eps_c * l2_radius_margin`` (a few ulps of delta's dtype inside eps), so
  rounding in the norm and into delta never leaves a class above ``eps_c``; the norm of the stepped row is summed in float64 (a float32
  sum over a row of millions lost more than the margin, and squares of entries near 1e19 overflowed it,
  shrinking a row inside the ball to zero).
The arithmetic runs in float64 when delta or grad is float64, else float32.
"""

from __future__ import annotations

import torch

from lpa_kernels._common import compute_dtype, l2_radius_margin
from lpa_kernels.perturb.naive import class_grad


def pgd_step_(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    norm: str = "linf",
) -> torch.Tensor:
    cd = compute_dtype(delta.dtype, grad.dtype)
    k = delta.shape[0]
    d, g = delta.detach().reshape(k, -1).to(cd), grad.detach().reshape(k, -1).to(cd)
    step, eps, direction = (v.to(cd).reshape(k, 1) for v in (step_size, eps, direction))
    if norm == "linf":
        sign = torch.where(torch.isnan(g), g, torch.sign(g))  # torch.sign(nan) is 0: keep the NaN
        new = torch.maximum(torch.minimum(d + step * direction * sign, eps), -eps)
    else:
        new = d + step * direction * l2_unit(g)
        length = torch.linalg.vector_norm(new, dim=1, keepdim=True, dtype=torch.float64)
        radius = eps - eps * l2_radius_margin(delta.dtype)
        # (float64 from here; copy_ rounds it into delta's dtype)
        new = torch.where(length > radius, new * (radius / length), new)
    active = (g != 0).any(dim=1, keepdim=True)
    with torch.no_grad():
        delta.copy_(torch.where(active, new, d).reshape(delta.shape))
    return delta


def guarded_pgd_step_(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    norm: str,
    ok: torch.Tensor,
    skipped: torch.Tensor,
) -> torch.Tensor:
    """``pgd_step_`` for the training step, with its guards: a class whose gradient has a non-finite entry
    keeps its delta (instead of taking the NaN), and so does every class when ``ok`` (0-d bool: the
    batch's labels were in range) is False; when ``ok``, the number of non-finite classes is added to the
    0-d int64 counter ``skipped`` in place."""
    return pgd_step_(delta, guarded_gradient(grad, ok, skipped), step_size, eps, direction, norm)


def guarded_gradient(grad: torch.Tensor, ok: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """``grad (K, *P)`` with the rows ``guarded_pgd_step_`` leaves out set to zero (a zero gradient keeps
    the class's delta); counts the non-finite rows of an ok batch into ``skipped``."""
    finite = torch.isfinite(grad.detach().reshape(grad.shape[0], -1)).all(dim=1)
    skipped += (~finite & ok).sum()
    return torch.where((finite & ok).view(-1, *([1] * (grad.dim() - 1))), grad.detach(), 0.0)


def l2_unit(g: torch.Tensor) -> torch.Tensor:
    """``g / (||g|| + 1e-12)`` per row of ``g (K, D)``, computed on ``g`` scaled by its largest entry;
    a row with Inf entries gives the normalised sign pattern of those entries. NaN propagates."""
    largest = g.abs().amax(dim=1, keepdim=True)  # NaN when the row holds NaN
    infinite = torch.isinf(largest)
    # g * 0 keeps NaN entries NaN where the finite entries become 0
    scaled = torch.where(infinite, torch.where(torch.isinf(g), torch.sign(g), g * 0), g / largest)
    tiny = torch.where(infinite, 0.0, 1e-12 / largest)  # the 1e-12 of the definition, scaled alike
    return scaled / (torch.linalg.vector_norm(scaled, dim=1, keepdim=True) + tiny)


def class_grad_pgd_step_(
    delta: torch.Tensor,
    grad_out: torch.Tensor,
    labels: torch.Tensor,
    step_size: torch.Tensor,
    eps: torch.Tensor,
    direction: torch.Tensor,
    norm: str = "linf",
    h: torch.Tensor | None = None,
    mode: str = "add",
) -> torch.Tensor:
    grad = class_grad(grad_out, labels, delta.shape[0], delta.shape, h=h, mode=mode)
    return pgd_step_(delta, grad, step_size, eps, direction, norm)
