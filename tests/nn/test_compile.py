"""``ClassPerturbation`` and ``LPALinear`` under ``torch.compile(fullgraph=True)``: one graph, no graph
break (fullgraph raises on one), no recompile after ``step()``, and the eager results for the forward,
both gradients and the single-pass step (CPU: reference, and triton under the interpreter)."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lpa_kernels.nn import ClassPerturbation, LPALinear
from tests.helpers import make_labels

K, BATCH, STEPS = 3, 6, 2


def _class_perturbation(backend, mode):
    return ClassPerturbation(K, (4, 1), mode=mode, eps=0.5, step_size=0.3, backend=backend)


def _lpa_linear(backend, mode):
    return LPALinear(5, 4, K, activation="gelu", mode=mode, eps=0.5, step_size=0.3, backend=backend)


def _train(module, forward, seed):
    """STEPS training steps (forward, backward, ``step``) of ``forward``; per step the output and the
    input's gradient, then the parameters' gradients and the final delta."""
    torch.manual_seed(seed)
    seen = []
    for _ in range(STEPS):
        shape = (BATCH, 4, 3) if isinstance(module, ClassPerturbation) else (BATCH, 5)
        h = torch.randn(shape, requires_grad=True)
        labels = make_labels(BATCH, K)
        out = forward(h, labels)
        (out * torch.randn_like(out)).sum().backward()
        assert module.step(), "the compiled backward left no class gradient for step()"
        seen += [out.detach(), h.grad]
    seen += [p.grad for p in module.parameters()]
    return seen + [module.perturbation.delta if isinstance(module, LPALinear) else module.delta]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("make", [_class_perturbation, _lpa_linear], ids=["ClassPerturbation", "LPALinear"])
def test_module_compiles_to_one_graph_and_matches_eager(make, mode, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make(backend, mode)
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")  # AOT autograd without inductor's C++ build
    expected = _train(eager, eager, seed=1)
    got = _train(twin, torch.compile(twin, fullgraph=True, backend=counter), seed=1)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: step() must not force a recompile"
    assert expected[-1].abs().sum() > 0, "delta never moved: the comparison shows nothing"
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_lpa_linear_compiles_with_inductor():
    torch._dynamo.reset()
    eager = _lpa_linear("reference", "add")
    twin = copy.deepcopy(eager)
    expected = _train(eager, eager, seed=2)
    got = _train(twin, torch.compile(twin, fullgraph=True), seed=2)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_the_class_gradient_leaf_follows_delta_when_the_module_moves():
    module = _class_perturbation("reference", "add").double()
    assert module.live_delta().dtype == torch.float64
    assert module.live_delta().data_ptr() == module.delta.data_ptr(), "the leaf must share delta's storage"
    twin = copy.deepcopy(module)
    assert twin.live_delta().data_ptr() == twin.delta.data_ptr() != module.delta.data_ptr()
    module.live_delta().grad = torch.ones_like(module.delta)  # a pending class gradient
    module.delta.data = module.delta.data.float()  # the buffer's storage replaced in place
    leaf = module.live_delta()
    assert leaf.data_ptr() == module.delta.data_ptr() and leaf.dtype == torch.float32
    assert torch.equal(leaf.grad, torch.ones_like(module.delta)), "the pending gradient is carried"
