"""torch.func transforms over the reference backend (SPEC: ops work under torch.func where reasonable):
grad and jacrev give autograd's gradients, vmap over an extra leading dimension maps the op."""

import torch
from torch.func import grad, jacrev, vmap

import lpa_kernels as lpa


def _inputs():
    h, delta = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    return h, torch.tensor([0, 2, 2, 1]), delta


def test_func_grad_of_perturb_wrt_delta_equals_autograd():
    h, y, delta = _inputs()
    loss = lambda d: lpa.perturb(h, y, d, mode="scale", backend="reference").sin().sum()  # noqa: E731
    expected = torch.autograd.functional.jacobian(loss, delta)
    assert torch.allclose(grad(loss)(delta), expected), "torch.func.grad of perturb differs from autograd"


def test_func_jacrev_of_linear_perturb_wrt_x_equals_autograd():
    x, w, y, delta = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.tensor([1, 0, 1]), torch.randn(2, 5, dtype=torch.float64)
    f = lambda x: lpa.linear_perturb(x, w, None, y, delta, activation="silu", backend="reference")  # noqa: E731
    assert torch.allclose(jacrev(f)(x), torch.autograd.functional.jacobian(f, x)), "jacrev of linear_perturb differs from autograd"


def test_vmap_of_perturb_over_a_leading_dimension_maps_each_slice():
    h, y, delta = _inputs()
    stacked = torch.stack([h, 2 * h, -h])
    mapped = vmap(lambda t: lpa.perturb(t, y, delta, backend="reference"))(stacked)
    expected = torch.stack([lpa.perturb(t, y, delta, backend="reference") for t in stacked])
    assert torch.equal(mapped, expected), "vmap(perturb) differs from perturb applied slice by slice"
