"""pytest-benchmark timings on the CPU: the reference ``perturb`` and one MLP training step.

Timings are reported, never asserted; the assertions check that what was timed computed the right thing.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lpa_kernels
from lpa_bench.training import NETWORKS, mlp, training_step

ROUNDS = dict(rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_reference_perturb_forward_backward(benchmark, mode):
    b, d, k = 512, 256, 10
    h = torch.randn(b, d, requires_grad=True)
    delta = (0.1 * torch.randn(k, d)).requires_grad_(True)
    labels = torch.randint(0, k, (b,))
    grad_out = torch.randn(b, d)

    def forward_backward():
        out = lpa_kernels.perturb(h, labels, delta, mode=mode, backend="reference")
        return (out, *torch.autograd.grad(out, (h, delta), grad_out))

    benchmark.group = "reference perturb fwd+bwd"
    benchmark.extra_info["bytes"] = 2 * ((2 * b * d + k * d) * 4 + b * 8)
    out, grad_h, grad_delta = benchmark.pedantic(forward_backward, **ROUNDS)
    picked = delta.detach()[labels]
    expected = h.detach() + picked if mode == "add" else h.detach() * (1 + picked)
    torch.testing.assert_close(out, expected, msg=f"perturb {mode} forward differs from h (+|*) delta[y]")
    per_sample = grad_out if mode == "add" else grad_out * h.detach()
    expected_grad_delta = torch.zeros(k, d).index_add_(0, labels, per_sample)
    torch.testing.assert_close(grad_delta, expected_grad_delta, msg="grad_delta is not the per-class sum")


@pytest.mark.parametrize("method,steps", [("erm", None), ("lpa", 0), ("lpa", 1), ("lpa", 3)],
                         ids=["erm", "lpa-T0", "lpa-T1", "lpa-T3"])
def test_mlp_training_step(benchmark, method, steps):
    """Compare the rows of the group "mlp training step": LPA's step time relative to erm's."""
    pytest.importorskip("lpa_kernels.lpa", reason="the LPA training machinery has not landed")
    torch.manual_seed(0)
    model = mlp(32, 64, 5)
    x, y = torch.randn(128, 32), torch.randint(0, 5, (128,))
    layer = next(iter(NETWORKS["mlp"].layers))
    step, built = training_step(method, steps, copy.deepcopy(model), x, y, 5, layer)
    lower_calls = []
    built.model.get_submodule(NETWORKS["mlp"].lower_entry).register_forward_hook(lambda *a: lower_calls.append(1))
    benchmark.group = "mlp training step"
    loss = benchmark.pedantic(step, **ROUNDS)
    assert torch.isfinite(loss), f"{method} T={steps} produced a non-finite loss"
    rounds = ROUNDS["rounds"] + ROUNDS["warmup_rounds"]
    benchmark.extra_info["lower_forwards_per_step"] = len(lower_calls) / rounds
    benchmark.extra_info["layer"] = layer
