"""``torch.compile(method.as_module(), fullgraph=True)`` for every method: no graph break (fullgraph raises
on one) and the eager training steps (losses, weights, deltas), on the reference backend (CPU).

The class-perturbation methods size their state (delta, the policies' tensors) from the first batch, so
their module is compiled after one eager step, as ``Method.compiled_training_loss`` does itself."""

import copy

import pytest
import torch

from lpa_kernels.lpa import METHODS, LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, batch, mlp

# the methods with class perturbations (LPA/LPL, with or without logit adjustment) and the others
PERTURBING = [m for m in METHODS if METHODS[m].meta.get("policies")]
BASELINES = [m for m in METHODS if m not in PERTURBING]
COUNTS = torch.tensor([40, 30, 20, 10])  # the logit-adjusted methods' prior


def _run(method, forwards, seed):
    """One training step per callable in ``forwards``; the losses, then the weights and delta."""
    optimizer = torch.optim.SGD(method.model.parameters(), lr=0.1)
    torch.manual_seed(seed)
    losses = []
    for step, forward in enumerate(forwards):
        x, y = batch(dtype=torch.float32, seed=step)
        loss, _ = forward(x, y)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses + list(method.model.parameters()) + [t for t in (getattr(method, "delta", None),) if t is not None]


@pytest.mark.parametrize("name,steps", [(m, 0) for m in BASELINES] + [(m, t) for m in PERTURBING for t in (0, 2)])
def test_compiled_as_module_matches_eager(name, steps):
    torch._dynamo.reset()
    config = LPAConfig(steps=steps, lpl_steps=steps, backend="reference")
    model = mlp(torch.float32)
    eager = build_method(name, model, NUM_CLASSES, layer="3", config=config, class_counts=COUNTS)
    twin = build_method(name, copy.deepcopy(model), NUM_CLASSES, layer="3", config=config, class_counts=COUNTS)
    expected = _run(eager, [eager.training_loss] * 3, seed=5)
    # aot_eager: dynamo's graph and AOT autograd without inductor's C++ build; "adv" and T-step PGD
    # differentiate the upper network inside the step, which dynamo traces only with trace_autograd_ops
    module = twin.as_module()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    first = module if name in PERTURBING else compiled  # state sized from the first batch, eagerly
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = _run(twin, [first, compiled, compiled], seed=5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
