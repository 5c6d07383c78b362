"""Gradient accumulation: the class gradients of several micro-batches before one ``after_backward`` sum,
so single-pass LPA takes the step one batch of all their samples would."""

import copy

import pytest
import torch

from lpa_kernels.backend import interpreting
from lpa_kernels.lpa import LPAConfig, build_method
from lpa_kernels.nn import ClassPerturbation
from lpa_kernels.perturb import naive
from tests.lpa.models import NUM_CLASSES, batch, mlp


@pytest.mark.parametrize("config", [
    dict(steps=0),  # confidence direction: the class statistics sum too
    dict(steps=0, norm="linf", mode="scale", radius="confidence"),
    dict(steps=0, direction="ascent", layer="1"),  # an inner layer
    # the fused kernels: the class statistics summed in place by the Triton kernel, the policy kernel
    pytest.param(dict(steps=0, radius="confidence", backend="triton"), marks=pytest.mark.skipif(
        not interpreting(), reason="the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")),
    pytest.param(dict(steps=0, direction="loss_trend", backend="triton"), marks=pytest.mark.skipif(
        not interpreting(), reason="the Triton kernels run on CPU tensors under TRITON_INTERPRET=1")),
])
def test_micro_batches_of_unequal_sizes_step_like_one_batch(config):
    config = dict(config)
    layer = config.pop("layer", "3")
    model = mlp()
    whole = build_method("lpa", model, NUM_CLASSES, layer=layer, config=LPAConfig(**config))
    parts = build_method("lpa", copy.deepcopy(model), NUM_CLASSES, layer=layer, config=LPAConfig(**config))
    for seed in range(3):  # delta moves away from 0, so later steps depend on it
        x, y = batch(size=11, seed=seed)
        loss, _ = whole.training_loss(x, y)
        loss.backward()
        whole.after_backward()
        for part in (slice(0, 7), slice(7, 11)):
            loss, _ = parts.training_loss(x[part], y[part])
            loss.backward()
        parts.after_backward()
        torch.testing.assert_close(parts.delta, whole.delta, rtol=1e-9, atol=1e-12)
    assert whole.delta.abs().sum() > 0, "delta never moved: the comparison shows nothing"


def test_class_perturbation_module_sums_micro_batch_gradients():
    delta = torch.randn(NUM_CLASSES, 6, dtype=torch.float64)
    module = ClassPerturbation(NUM_CLASSES, (6,), dtype=torch.float64)
    module.delta.copy_(delta)
    h, y = batch(size=9)
    for part in (slice(0, 5), slice(5, 9)):
        module(h[part], y[part]).pow(2).sum().backward()
    # d/d delta of sum((h + delta[y])^2) over both parts: the class sums of 2 (h + delta[y]), from perturb's
    # definition on all 9 samples at once
    expected = naive.class_grad(2 * naive.perturb(h, y, delta), y, NUM_CLASSES, delta.shape)
    torch.testing.assert_close(module._live.grad, expected)
    assert module.step()
    assert module._live is None or module._live.grad is None
