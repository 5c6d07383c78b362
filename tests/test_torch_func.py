"""torch.func transforms and forward-mode AD (SPEC: ops work under torch.func where reasonable): grad and
jacrev give autograd's gradients, vmap over an extra leading dimension maps the op, jvp/jacfwd and dual
tensors carry tangents, on every backend (the custom ops have no forward or batching rules: under a
transform the ops run their definition; without that, PyTorch dropped the tangent, a zero Jacobian)."""

import pytest
import torch
import torch.autograd.forward_ad as fw
from torch.func import grad, jacfwd, jacrev, vmap

import lpa_kernels as lpa
from lpa_kernels.perturb import naive
from tests.helpers import KERNEL_TARGETS

BACKENDS = [pytest.param("reference", id="reference"),
            *[pytest.param(t.values[0][0], id=t.id, marks=t.marks) for t in KERNEL_TARGETS if t.id == "triton-interp"]]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_the_labels_maps_each_set_and_checks_them_all(backend):
    """The labels' range check reads every batch's labels through vmap's wrapper (a wrapped tensor has no
    storage to read): each set maps as the op does alone, and a bad label in any set raises the op's error."""
    h, y, delta = _inputs()
    sets = torch.stack([y, y.flip(0), torch.zeros_like(y)])
    for op in (lambda t: lpa.perturb(h, t, delta, backend=backend),
               lambda t: lpa.class_grad(h, t, 3, delta.shape, backend=backend)):
        expected = torch.stack([op(t) for t in sets])
        assert torch.equal(vmap(op)(sets), expected), "vmap over the labels differs from each set alone"
        bad = sets.clone()
        bad[2, 1] = 3
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*got values in \[0, 3\]"):
            vmap(op)(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_forward_mode_tangents_and_jacfwd_match_the_definition(backend, mode):
    h, y, delta = _inputs()
    th, td = torch.randn_like(h), torch.randn_like(delta)
    tangents = []
    for op in (lambda a, d: lpa.perturb(a, y, d, mode, backend=backend), lambda a, d: naive.perturb(a, y, d, mode)):
        with fw.dual_level():
            tangents.append(fw.unpack_dual(op(fw.make_dual(h, th), fw.make_dual(delta, td))).tangent)
    assert tangents[0] is not None, "the tangent was dropped"
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-12, atol=0)
    f = lambda d: lpa.perturb(h, y, d, mode, backend=backend)  # noqa: E731
    torch.testing.assert_close(jacfwd(f)(delta), jacrev(f)(delta), rtol=1e-12, atol=0)
    assert jacfwd(f)(delta).abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_grad_and_linear_perturb_carry_tangents(backend):
    h, y, _ = _inputs()
    with fw.dual_level():
        out = lpa.class_grad(fw.make_dual(h, torch.ones_like(h)), y, 3, (3, 5), backend=backend)
        tangent = fw.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, naive.class_grad(torch.ones_like(h), y, 3, (3, 5)))
    x, w, delta = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    f = lambda x: lpa.linear_perturb(x, w, None, y, delta, activation="gelu", backend=backend)  # noqa: E731
    torch.testing.assert_close(jacfwd(f)(x), torch.autograd.functional.jacobian(f, x), rtol=1e-10, atol=1e-12)
