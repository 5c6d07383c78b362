"""The in-place PGD ops under ``torch.compile(fullgraph=True)``: no graph break (the aliasing check has no
data pointer to read on Dynamo's fake tensors and is skipped while tracing, as the value checks are) and
the eager result."""

import pytest
import torch

from lpa_kernels import class_grad_pgd_step_, head_pgd_, pgd_step_
from tests.helpers import KERNEL_TARGETS, make_labels

TARGETS = [pytest.param(("reference", "cpu"), id="reference")] + KERNEL_TARGETS


def _steps(delta, h, grad, labels, weight, backend):
    pgd_step_(delta, grad, 0.1, 0.5, 1.0, "l2", backend=backend)
    class_grad_pgd_step_(delta, h, labels, 0.1, 0.5, -1.0, "linf", backend=backend)
    head_pgd_(h, labels, weight, None, delta, 2, 0.1, 0.5, "confidence", "l2", "add", backend=backend)
    return delta


@pytest.mark.parametrize("target", TARGETS)
def test_in_place_ops_compile_without_graph_break_and_match_eager(target):
    backend, device = target
    torch._dynamo.reset()
    torch.manual_seed(0)
    delta, h, grad, weight = (torch.randn(*s, device=device) for s in ((3, 4), (7, 4), (3, 4), (3, 4)))
    labels = make_labels(7, 3, device)
    expected = _steps(delta.clone(), h, grad, labels, weight, backend)
    compiled = torch.compile(_steps, fullgraph=True, backend="aot_eager")
    got = compiled(delta.clone(), h, grad, labels, weight, backend)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op", ["pgd_step_", "class_grad_pgd_step_"])
def test_consecutive_l2_steps_compile_with_inductor(op):
    """Two L2 steps on one delta in one graph, compiled by Inductor (the default backend): inlined, the
    definition's ops crashed Inductor's CPU code generation (KeyError 'bufN', PyTorch issues 188228 and
    196570); the reference backend's step is an opaque custom op under compile."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    delta, grad_out, labels = torch.randn(7, 17), torch.randn(20, 17), torch.arange(20) % 7
    grad = grad_out[:7]

    def two_steps(delta):
        with torch.no_grad():
            for direction in (1.0, -0.5):
                if op == "pgd_step_":
                    pgd_step_(delta, grad, 0.1, 1.0, direction, "l2", backend="reference")
                else:
                    class_grad_pgd_step_(delta, grad_out, labels, 0.1, 1.0, direction, "l2", backend="reference")
        return delta

    expected = two_steps(delta.clone())
    got = torch.compile(two_steps, fullgraph=True)(delta.clone())
    assert not torch.equal(expected, delta)
    torch.testing.assert_close(got, expected)
