"""Single pass: the training forward perturbs with the delta the site updates, also after delta was given
new memory mid-run (its ``.data`` replaced, ``.double()``, another tensor assigned), with a pending class
gradient carried over to the new memory."""

import copy

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, batch, mlp


def _moved(method, how):
    perturbation = method.lpa.perturbation
    with torch.no_grad():
        if how == "data replaced":
            perturbation.delta.data = perturbation.delta.data.clone()
        elif how == "to float32":
            perturbation.float()
        else:  # a new tensor assigned
            perturbation.delta = perturbation.delta.detach().clone()


def _features(model, x):
    return model[3](model[2](model[1](model[0](x))))  # the activations of layer "3", perturbed


@pytest.mark.parametrize("how", ["data replaced", "to float32", "assigned"])
def test_the_training_forward_reads_the_current_delta(how):
    model = mlp()
    method = build_method("lpa", model, NUM_CLASSES, layer="3", config=LPAConfig(steps=0, backend="reference"))
    for seed in range(2):  # delta moves away from 0
        x, y = batch(seed=seed)
        loss, _ = method.training_loss(x, y)
        loss.backward()
        method.after_backward()
    _moved(method, how)
    for seed in range(2, 4):
        x, y = batch(seed=seed)
        delta = method.lpa.perturbation.delta.detach().clone()
        assert delta.abs().sum() > 0
        _, logits = method.training_loss(x, y)
        h = _features(model, x)
        want = model[5](model[4](h + delta.to(h.dtype)[y]))
        torch.testing.assert_close(logits.detach(), want.detach())
        logits.sum().backward()
        method.after_backward()
        assert not torch.equal(method.lpa.perturbation.delta, delta)  # the update reached the delta read


def test_a_pending_class_gradient_survives_the_move():
    """A micro-batch's backward before the move and one after it sum, as without the move."""
    model = mlp()
    runs = []
    for move in (False, True):
        method = build_method("lpa", copy.deepcopy(model), NUM_CLASSES, layer="3",
                              config=LPAConfig(steps=0, backend="reference"))
        x, y = batch(size=12, seed=5)
        method.training_loss(x[:6], y[:6])[0].backward()
        if move:
            _moved(method, "data replaced")
        method.training_loss(x[6:], y[6:])[0].backward()
        method.after_backward()
        runs.append(method.lpa.perturbation.delta.detach().clone())
    assert runs[0].abs().sum() > 0
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)

