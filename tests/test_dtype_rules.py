"""The mixed-dtype rule of the public ops (stated in ``_checks``' module docstring and each op's docstring):
``delta`` may have any float dtype whatever ``h``/``x`` has, and ``pgd_step_``'s ``grad`` any float dtype
whatever ``delta`` has. Results come back in the dtype of what they stand for (``h~``/``out`` in h's/x's
dtype, ``grad_delta`` and the updated ``delta`` in delta's dtype) and are at least as accurate as float32
math on the same (rounded) inputs (float64 math for float64 activations): checked against float64 math
with the tolerance rule, PyTorch's own error taken from float32 math."""

import pytest
import torch

from lpa_kernels import head_pgd_, linear_perturb, perturb, pgd_step_
from lpa_kernels.head_pgd import naive as head_naive
from lpa_kernels.linear_perturb import naive as linear_naive
from lpa_kernels.perturb import naive as perturb_naive
from lpa_kernels.pgd import naive as pgd_naive
from tests.helpers import KERNEL_TARGETS, assert_close_to_reference, make_labels

TARGETS = [pytest.param(("reference", "cpu"), id="reference")] + KERNEL_TARGETS
# (dtype of h / x / grad, dtype of delta): wider and narrower deltas than the activations
PAIRS = [(torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float64, torch.float32), (torch.float16, torch.float32)]
IDS = [f"{str(a)[6:]}-{str(b)[6:]}" for a, b in PAIRS]
K = 3


def _leaf(t):
    return t.detach().requires_grad_(True)


@pytest.mark.parametrize("h_dtype,delta_dtype", PAIRS, ids=IDS)
@pytest.mark.parametrize("target", TARGETS)
def test_perturb_and_linear_perturb_with_a_delta_of_another_dtype(target, h_dtype, delta_dtype):
    backend, device = target
    torch.manual_seed(0)
    labels = make_labels(7, K, device)
    h, delta = torch.randn(7, 5, device=device, dtype=h_dtype), (0.3 * torch.randn(K, 5, device=device)).to(delta_dtype)
    h, delta = _leaf(h), _leaf(delta)
    out = perturb(h, labels, delta, "scale", backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    h64, delta64 = _leaf(h.double()), _leaf(delta.double())
    perturb_naive.perturb(h64, labels, delta64, "scale").backward(grad_out.double())
    assert (out.dtype, h.grad.dtype, delta.grad.dtype) == (h_dtype, h_dtype, delta_dtype)
    assert_close_to_reference(out, perturb_naive.perturb(h64, labels, delta64, "scale"), what="perturb h~")
    assert_close_to_reference(h.grad, h64.grad, what="perturb grad_h")
    assert_close_to_reference(delta.grad, delta64.grad, what="perturb grad_delta")

    x, weight, bias = (_leaf(torch.randn(*s, device=device, dtype=h_dtype)) for s in ((7, 6), (5, 6), (5,)))
    delta.grad = None
    out = linear_perturb(x, weight, bias, labels, delta, "gelu", "add", backend=backend)
    out.backward(grad_out)
    inputs64 = [_leaf(t.double()) for t in (x, weight, bias, delta)]
    out64 = linear_naive.linear_perturb(inputs64[0], inputs64[1], inputs64[2], labels, inputs64[3], "gelu", "add")
    out64.backward(grad_out.double())
    compute = torch.float64 if h_dtype == torch.float64 else torch.float32
    inputs32 = [_leaf(t.to(compute)) for t in (x, weight, bias, delta)]
    linear_naive.linear_perturb(inputs32[0], inputs32[1], inputs32[2], labels, inputs32[3], "gelu", "add").backward(
        grad_out.to(compute))
    assert (out.dtype, x.grad.dtype, delta.grad.dtype) == (h_dtype, h_dtype, delta_dtype)
    assert_close_to_reference(out, out64, what="linear_perturb out")
    assert_close_to_reference(delta.grad, inputs64[3].grad, inputs32[3].grad, what="linear_perturb grad_delta")


@pytest.mark.parametrize("grad_dtype,delta_dtype", PAIRS, ids=IDS)
@pytest.mark.parametrize("target", TARGETS)
def test_pgd_steps_with_a_gradient_or_activations_of_another_dtype(target, grad_dtype, delta_dtype):
    backend, device = target
    torch.manual_seed(1)
    per_class = lambda v: torch.full((K,), v, dtype=torch.float64, device=device)  # noqa: E731
    delta = (0.2 * torch.randn(K, 6, device=device)).to(delta_dtype)
    grad = torch.randn(K, 6, device=device).to(grad_dtype)
    expected = pgd_naive.pgd_step_(delta.double().clone(), grad.double(), per_class(0.1), per_class(0.5), per_class(1.0), "l2")
    got = pgd_step_(delta.clone(), grad, 0.1, 0.5, 1.0, "l2", backend=backend)
    assert got.dtype == delta_dtype
    assert_close_to_reference(got, expected, expected.to(delta_dtype), what="pgd_step_ delta")

    h, weight = torch.randn(8, 6, device=device).to(grad_dtype), torch.randn(K, 6, device=device).to(grad_dtype)
    labels = make_labels(8, K, device)
    expected = head_naive.head_pgd_(h.double(), labels, weight.double(), None, delta.double().clone(), 2, per_class(0.1),
                                    per_class(0.5), per_class(1.0), "l2", "add")
    # the fused head rounds the perturbed activations to h's dtype, as perturb + F.linear would: PyTorch's
    # own error is that of the loop in h's dtype
    lowp = head_naive.head_pgd_(h, labels, weight, None, delta.to(grad_dtype), 2, per_class(0.1), per_class(0.5),
                                per_class(1.0), "l2", "add")
    got = head_pgd_(h, labels, weight, None, delta.clone(), 2, 0.1, 0.5, 1.0, "l2", "add", backend=backend)
    assert got.dtype == delta_dtype
    assert_close_to_reference(got, expected, lowp, what="head_pgd_ delta")
