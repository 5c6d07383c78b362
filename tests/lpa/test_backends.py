"""The LPA machinery on the fast backends equals the reference backend (float32, small shapes)."""

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from lpa_kernels.nn import ClassPerturbation, LPALinear
from tests.helpers import KERNEL_TARGETS
from tests.lpa.models import NUM_CLASSES, batch, mlp

CONFIGS = {
    "single-pass": dict(steps=0),
    "head-path": dict(steps=2, head="always", init="carried"),
    "autograd-pgd-scale": dict(steps=2, head="never", mode="scale"),
}


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_method_deltas_on_fast_backend_equal_reference(target, case):
    backend, device = target
    x, y = (t.to(device) for t in batch(dtype=torch.float32))
    deltas = {}
    for chosen in ("reference", backend):
        torch.manual_seed(0)
        model = mlp(torch.float32).to(device)
        method = build_method("lpa", model, NUM_CLASSES, layer="4", config=LPAConfig(backend=chosen, **CONFIGS[case]))
        for _ in range(2):
            loss, _ = method.training_loss(x, y)
            loss.backward()
            method.after_backward()
        deltas[chosen] = method.delta.detach().cpu()
    assert deltas["reference"].abs().sum() > 0
    assert torch.allclose(deltas[backend], deltas["reference"], rtol=1e-4, atol=1e-6), f"{case}: {backend} delta differs"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_modules_on_fast_backend_equal_reference(target):
    backend, device = target
    x, labels = torch.randn(5, 6, device=device), torch.tensor([0, 2, 1, 2, 0], device=device)
    grads = {}
    for chosen in ("reference", backend):
        torch.manual_seed(0)
        linear = LPALinear(6, 7, 3, activation="gelu", backend=chosen, device=device)
        perturbation = ClassPerturbation(3, (7,), mode="scale", backend=chosen, device=device)
        with torch.no_grad():
            linear.perturbation.delta.uniform_(-0.5, 0.5)
            perturbation.delta.uniform_(-0.5, 0.5)
        out = perturbation(linear(x, labels), labels)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        linear.step()
        perturbation.step()
        grads[chosen] = [t.detach().cpu() for t in (out, linear.weight.grad, linear.perturbation.delta, perturbation.delta)]
    for name, got, want in zip(("output", "weight grad", "linear delta", "delta"), grads[backend], grads["reference"]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"{name} on {backend} differs from the reference"
