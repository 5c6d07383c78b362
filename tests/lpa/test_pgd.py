"""The controller's PGD against a naive, obviously correct loop written here (reference backend)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, TinyResNet, batch, mlp


def naive_step(delta, g, step, eps, direction, norm):
    """One projected step per class, as SPEC section 1 writes it (classes with zero gradient skipped)."""
    for c in range(delta.shape[0]):
        if not g[c].any():
            continue
        if norm == "linf":
            delta[c] = (delta[c] + step * direction[c] * g[c].sign()).clamp(-eps[c], eps[c])
        else:
            moved = delta[c] + step * direction[c] * g[c] / (g[c].norm() + 1e-12)
            delta[c] = moved * eps[c] / moved.norm() if moved.norm() > eps[c] else moved


def naive_confidence(logits, y, k):
    p_true = logits.softmax(1)[torch.arange(len(y)), y]
    present = [c for c in range(k) if (y == c).any()]
    p = {c: p_true[y == c].mean() for c in present}
    thr = sum(p.values()) / len(p)
    return torch.tensor([float(torch.sign(thr - p[c])) if c in p else 0.0 for c in range(k)], dtype=logits.dtype)


def naive_class_grad(upper, h, y, delta, mode):
    d = delta.clone().requires_grad_(True)
    perturbed = h + d[y] if mode == "add" else h * (1 + d[y])
    logits = upper(perturbed)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), d)
    return g, logits.detach()


def naive_pgd(upper, h, y, delta, steps, step, eps, direction, norm, mode):
    for t in range(steps):
        g, logits = naive_class_grad(upper, h, y, delta, mode)
        if t == 0 and direction == "confidence":
            direction = naive_confidence(logits, y, delta.shape[0])
        naive_step(delta, g, step, eps, direction, norm)
    return delta


DIRECTIONS = {
    "ascent": lambda: torch.ones(NUM_CLASSES, dtype=torch.float64),
    "descent": lambda: -torch.ones(NUM_CLASSES, dtype=torch.float64),
    "confidence": lambda: "confidence",
    "tensor": lambda: torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64),
}


# Every value of each setting appears at least once (all combinations would add time, not coverage).
T_STEP_CASES = [
    (1, "linf", "add", "ascent", "fresh"),
    (3, "linf", "scale", "descent", "carried"),
    (3, "l2", "add", "confidence", "fresh"),
    (2, "l2", "scale", "confidence", "carried"),
    (3, "linf", "add", "tensor", "carried"),
    (2, "l2", "add", "descent", "fresh"),
    (1, "l2", "scale", "tensor", "fresh"),
    (3, "linf", "scale", "ascent", "carried"),
]


@pytest.mark.parametrize("steps, norm, mode, direction, init", T_STEP_CASES)
def test_t_step_pgd_equals_naive_loop(steps, norm, mode, direction, init):
    model = mlp()
    user_direction = DIRECTIONS[direction]()
    config = LPAConfig(mode=mode, norm=norm, eps=0.3, step_size=0.12, steps=steps, init=init, head="never",
                       direction=user_direction if direction in ("tensor",) else direction)
    method = build_method("lpa", model, NUM_CLASSES, layer="1", config=config)
    lower, upper = model[:2], model[2:]
    expected = torch.zeros(NUM_CLASSES, 9, dtype=torch.float64)
    eps = torch.full((NUM_CLASSES,), 0.3, dtype=torch.float64)
    for seed in (1, 2):  # two batches: carried keeps delta across them, fresh restarts at 0
        x, y = batch(seed=seed)
        method.training_loss(x, y)
        if init == "fresh":
            expected.zero_()
        naive_pgd(upper, lower(x).detach(), y, expected, steps, 0.12, eps, user_direction, norm, mode)
        assert torch.allclose(method.delta, expected, rtol=1e-10, atol=1e-12), \
            f"delta after {steps} PGD steps differs from the naive loop (batch {seed})"


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_single_pass_equals_naive_step_and_trains_on_the_perturbed_forward(norm, mode):
    model = mlp()
    reference_model = copy.deepcopy(model)
    config = LPAConfig(mode=mode, norm=norm, eps=0.4, step_size=0.15, steps=0, direction="confidence")
    method = build_method("lpa", model, NUM_CLASSES, layer="3", config=config)
    expected = torch.zeros(NUM_CLASSES, 7, dtype=torch.float64)
    eps = torch.full((NUM_CLASSES,), 0.4, dtype=torch.float64)
    for seed in (1, 2, 3):
        x, y = batch(seed=seed)
        model.zero_grad()
        reference_model.zero_grad()
        loss, _ = method.training_loss(x, y)
        loss.backward()

        h = reference_model[:4](x)
        perturbed = h + expected[y] if mode == "add" else h * (1 + expected[y])
        logits = reference_model[4:](perturbed)
        F.cross_entropy(logits, y).backward()
        assert torch.allclose(loss, F.cross_entropy(logits, y), rtol=1e-12), "training loss is not the perturbed forward's CE"
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), f"weight gradient {name} differs"

        method.after_backward()
        g, _ = naive_class_grad(reference_model[4:], h.detach(), y, expected, mode)
        naive_step(expected, g, 0.15, eps, naive_confidence(logits.detach(), y, NUM_CLASSES), norm)
        assert torch.allclose(method.delta, expected, rtol=1e-10, atol=1e-12), f"single-pass delta differs (step {seed})"


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("radius", ["constant", "confidence"])
def test_head_fast_path_equals_autograd_path(norm, mode, radius):
    x, y = batch()
    deltas = {}
    for head in ("always", "never"):
        torch.manual_seed(0)
        model = mlp()
        config = LPAConfig(mode=mode, norm=norm, eps=0.5, step_size=0.2, steps=3, head=head, radius=radius, init="carried")
        method = build_method("lpa", model, NUM_CLASSES, layer="4", config=config)
        for _ in range(2):
            method.training_loss(x, y)
        deltas[head] = method.delta.clone()
        expected_upper = 2 if head == "always" else 2 * 4
        assert method.stats()["upper_forwards"] == expected_upper, f"head={head}: wrong number of upper forwards"
    assert deltas["always"].abs().sum() > 0, "head path left delta at zero"
    assert torch.allclose(deltas["always"], deltas["never"], rtol=1e-10, atol=1e-12), "head_pgd_ path differs from autograd"


def test_head_fast_path_through_flatten_equals_autograd_path_on_resnet():
    x, y = batch(size=8, features=(3, 6, 6))
    deltas = {}
    for head in ("always", "never"):
        torch.manual_seed(0)
        model = TinyResNet().double()
        method = build_method("lpa", model, NUM_CLASSES, layer="avgpool",
                              config=LPAConfig(steps=2, head=head, eps=0.5, step_size=0.3))
        method.training_loss(x, y)
        deltas[head] = method.delta.clone()
    assert deltas["always"].shape == (NUM_CLASSES, 6, 1, 1)
    assert torch.allclose(deltas["always"], deltas["never"], rtol=1e-10, atol=1e-12), "flatten head path differs"


def test_head_always_refuses_a_layer_that_does_not_feed_the_classifier():
    x, y = batch()
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="1", config=LPAConfig(head="always"))
    with pytest.raises(ValueError, match="head='always'"):
        method.training_loss(x, y)
