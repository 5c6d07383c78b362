"""pgd_step_ and class_grad_pgd_step_ against the float64 reference, per backend x dtype x norm.

Every problem includes a class with an exactly-zero gradient (absent from the batch for the fused
op) whose delta starts outside the eps-ball: it must come back bit for bit, unprojected.
"""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import class_grad_pgd_step_, pgd_step_
from lpa_kernels.pgd import naive
from tests.helpers import DTYPES, KERNEL_TARGETS, assert_close_to_reference
from tests.perturb.test_perturb import FEW_PRESENT, LAYOUTS, MANY_CLASSES, MODES, TARGETS, absent_classes

NORMS = ("linf", "l2")
K = 5
IDLE = 3  # the class with a zero gradient


def hyperparameters(per_class: bool, device):
    """``(step_size, eps, direction)``: Python floats, or ``(K,)`` tensors with mixed signs."""
    if not per_class:
        return 0.3, 1.5, -1.0
    return (torch.rand(K, device=device) * 0.5, torch.rand(K, device=device) + 0.5,
            torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5], device=device))


def reference_step(fn, delta, *tensors_and_rest, step_size, eps, direction, **kw):
    """``fn`` (a naive op) on a float64 copy of ``delta`` and float64 inputs; returns the new delta."""
    as64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    per_class = [torch.as_tensor(v, dtype=torch.float64, device=delta.device).expand(K).contiguous()
                 for v in (step_size, eps, direction)]
    new = delta.double().clone()
    args = [as64(t) for t in tensors_and_rest]
    return fn(new, *args, *per_class, **{k: as64(v) for k, v in kw.items()})


def lowp_step(fn, delta, *tensors_and_rest, step_size, eps, direction, **kw):
    """The same naive op on the low-precision inputs (its float32 arithmetic rounded to delta.dtype)."""
    per_class = [torch.as_tensor(v, dtype=torch.float32, device=delta.device).expand(K).contiguous()
                 for v in (step_size, eps, direction)]
    return fn(delta.clone(), *tensors_and_rest, *per_class, **kw)


@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per_class"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_pgd_step_matches_reference(target, dtype, norm, per_class):
    backend, device = target
    delta = (2 * torch.randn(K, 3, 37, device=device)).to(dtype)  # most entries outside the ball
    grad = torch.randn(K, 3, 37, device=device).to(dtype)
    grad[IDLE] = 0
    step_size, eps, direction = hyperparameters(per_class, device)
    ref = reference_step(naive.pgd_step_, delta, grad, step_size=step_size, eps=eps, direction=direction, norm=norm)
    lowp = lowp_step(naive.pgd_step_, delta, grad, step_size=step_size, eps=eps, direction=direction, norm=norm)
    got = delta.clone()
    returned = pgd_step_(got, grad, step_size, eps, direction, norm, backend=backend)
    assert returned is got, "pgd_step_ must return its delta argument"
    assert_close_to_reference(got, ref, lowp, what=f"pgd_step_ {norm} ({backend})")
    assert torch.equal(got[IDLE], delta[IDLE]), "a class with a zero gradient must keep its delta"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_pgd_step_odd_sizes_nan_and_strided_delta(target, norm):
    backend, device = target
    sizes = [(1, 1), (1, 2500)] + ([(1000, 3)] if norm == "linf" else [])  # one class, D over a block, many
    for k, d in sizes:
        delta, grad = torch.randn(d, k, device=device).t(), torch.randn(k, d, device=device)  # strided delta
        step, eps = torch.rand(k, device=device) + 0.1, torch.rand(k, device=device) + 0.1
        ref = naive.pgd_step_(delta.double().clone(), grad.double(), step.double(), eps.double(), torch.ones(k, dtype=torch.float64, device=device), norm)
        assert_close_to_reference(pgd_step_(delta, grad, step, eps, 1.0, norm, backend=backend), ref, what=f"pgd_step_ K={k} D={d}")
    delta, grad = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    grad[1, 2] = float("nan")
    ref = naive.pgd_step_(delta.double().clone(), grad.double(), *(torch.full((4,), 0.5, dtype=torch.float64, device=device),) * 3, norm)
    assert_close_to_reference(pgd_step_(delta, grad, 0.5, 0.5, 0.5, norm, backend=backend), ref, what="NaN gradient")


@pytest.mark.parametrize("per_class", [False, True], ids=["scalar", "per_class"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["full", "channel", "last_dim", "broadcast"])
@pytest.mark.parametrize("target", TARGETS)
def test_class_grad_pgd_step_matches_reference(target, layout, norm, mode, per_class):
    backend, device = target
    features, per_class_shape = LAYOUTS[layout]
    delta = 2 * torch.randn(K, *per_class_shape, device=device)
    grad_out, h = torch.randn(2, 9, *features, device=device)
    labels = torch.tensor([0, 1, 2, 4, 0, 4, 1, 0, 2], device=device)  # class IDLE is absent
    step_size, eps, direction = hyperparameters(per_class, device)
    ref = reference_step(naive.class_grad_pgd_step_, delta, grad_out, labels, step_size=step_size, eps=eps,
                         direction=direction, norm=norm, h=h, mode=mode)
    got = delta.clone()
    returned = class_grad_pgd_step_(got, grad_out, labels, step_size, eps, direction, norm, h=h, mode=mode, backend=backend)
    assert returned is got, "class_grad_pgd_step_ must return its delta argument"
    assert_close_to_reference(got, ref, what=f"class_grad_pgd_step_ {norm} {mode} ({backend})")
    assert torch.equal(got[IDLE], delta[IDLE]), "a class absent from the batch must keep its delta"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_pgd_step_low_precision_and_edge_batches(target, dtype, norm):
    backend, device = target
    for batch in (0, 1, 7):
        delta = torch.randn(K, 4, 1, 1, device=device).to(dtype)
        grad_out, h = torch.randn(2, batch, 4, 3, 5, device=device).to(dtype)
        labels = torch.randint(0, K, (batch,), device=device, dtype=torch.int32)
        kw = dict(step_size=0.2, eps=0.8, direction=1.0)
        ref = reference_step(naive.class_grad_pgd_step_, delta, grad_out, labels, **kw, norm=norm, h=h, mode="scale")
        lowp = lowp_step(naive.class_grad_pgd_step_, delta, grad_out, labels, **kw, norm=norm, h=h, mode="scale")
        got = class_grad_pgd_step_(delta.clone(), grad_out, labels, 0.2, 0.8, 1.0, norm, h=h, mode="scale", backend=backend)
        assert_close_to_reference(got, ref, lowp, what=f"class_grad_pgd_step_ B={batch} {dtype} {norm}")
        if batch == 0:
            assert torch.equal(got, delta), "an empty batch must leave delta unchanged"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_pgd_step_with_far_more_classes_than_samples(target, norm):
    """K = 10,000 classes and 7 samples of 4 of them: only the classes present move; the others keep
    their delta bit for bit (deltas start outside the eps-ball, so a stray projection would show)."""
    backend, device = target
    delta = 2 * torch.randn(MANY_CLASSES, 13, device=device)
    grad_out, h = torch.randn(2, 7, 13, device=device)
    labels = torch.tensor(FEW_PRESENT, device=device)
    step, eps = torch.rand(MANY_CLASSES, device=device) * 0.5, torch.rand(MANY_CLASSES, device=device) + 0.5
    direction = torch.where(torch.rand(MANY_CLASSES, device=device) < 0.5, -1.0, 1.0)
    ref = naive.class_grad_pgd_step_(delta.double(), grad_out.double(), labels, step.double(), eps.double(),
                                     direction.double(), norm, h=h.double(), mode="scale")
    got = class_grad_pgd_step_(delta.clone(), grad_out, labels, step, eps, direction, norm, h=h, mode="scale", backend=backend)
    assert_close_to_reference(got, ref, what=f"class_grad_pgd_step_ K={MANY_CLASSES} {norm} ({backend})")
    absent = absent_classes(labels, MANY_CLASSES)
    assert torch.equal(got[absent], delta[absent]), "classes absent from the batch must keep their delta"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_opcheck_pgd_custom_ops(target):
    backend, device = target
    step, eps, direction = (torch.full((K,), v, device=device) for v in (0.3, 1.0, -1.0))
    delta, grad = torch.randn(K, 6, device=device), torch.randn(K, 6, device=device)
    grad_out, h = torch.randn(2, 7, 2, 6, device=device)
    labels = torch.randint(0, K, (7,), device=device)
    for norm in NORMS:
        torch.library.opcheck(torch.ops.lpa_kernels.pgd_step_, (delta.clone(), grad, step, eps, direction, norm, backend))
        for mode in MODES:
            torch.library.opcheck(
                torch.ops.lpa_kernels.class_grad_pgd_step_,
                (delta.clone(), grad_out, labels, h, step, eps, direction, 1, mode, norm, backend),
            )
