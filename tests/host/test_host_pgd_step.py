"""``pgd_step_`` and the training step's guarded step on the reference backend's two CPU paths (the host
C++ kernel and the PyTorch ops, the ``reference_path`` fixture) against ``pgd/naive.py``, with every
kind of gradient row its docstring names."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import pgd_step_
from lpa_kernels._common import per_class
from lpa_kernels.pgd import naive
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from tests.helpers import assert_close_to_reference

DTYPES = (torch.float32, torch.float64)
INF, NAN = float("inf"), float("nan")


def gradient_rows(features, dtype):
    """``(10, features)``: ordinary, all-zero, one NaN, one +Inf, +-Inf, huge and tiny finite rows, a
    single non-zero entry, a row of -0.0 and one NaN in the last entry (the kernel's tail after its
    eight-entry blocks, for 13 features)."""
    g = torch.randn(10, features, dtype=torch.float64)
    g[1] = 0
    g[2, features // 2] = NAN
    g[3, 0] = INF
    g[4, 0], g[4, -1] = INF, -INF
    g[5] *= 1e30
    g[6] *= 1e-30
    g[7] = 0
    g[7, -1] = -3.0
    g[8] = -0.0
    g[9, -1] = NAN
    return g.to(dtype)


def hyperparameters(classes, dtype):
    """Per-class step sizes (one 0), radii and directions of every sign (one 0), as ``per_class`` makes them."""
    step = torch.linspace(0.0, 0.9, classes)
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.25])[torch.arange(classes) % 5]
    return [per_class(v.to(dtype), classes, torch.empty(0, dtype=dtype)) for v in (step, torch.full((classes,), 0.7),
                                                                                   direction)]


def start_delta(classes, features, dtype):
    """A carried delta with some rows outside the ball (the projection moves them)."""
    return (torch.randn(classes, features) * torch.linspace(0.01, 1.0, classes)[:, None]).to(dtype)


def expected(fn, delta, grad, hyper, norm, *guard):
    """``fn`` (a naive step) in float64 and in ``delta``'s dtype: ``(truth, PyTorch's own result)``."""
    truth, lowp = delta.double(), delta.clone()
    fn(truth, grad.double(), *(v.double() for v in hyper), norm, *(g.clone() for g in guard))
    fn(lowp, grad, *hyper, norm, *(g.clone() for g in guard))
    return truth, lowp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("features", [1, 13, 40])
def test_pgd_step_matches_the_definition(reference_path, dtype, norm, features):
    grad = gradient_rows(features, dtype)
    hyper = hyperparameters(grad.shape[0], dtype)
    delta = start_delta(*grad.shape, dtype)
    truth, lowp = expected(naive.pgd_step_, delta, grad, hyper, norm)
    assert pgd_step_(delta, grad, *hyper, norm, backend="reference") is delta
    assert_close_to_reference(delta, truth, lowp, what=f"pgd_step_ {norm} D={features}")


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_step_on_per_class_blocks_with_a_strided_gradient(reference_path, norm):
    """``delta (K, 2, 3)`` and K = 1; the gradient a transposed view."""
    for shape in [(4, 2, 3), (1, 1)]:
        grad = torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))
        hyper = hyperparameters(shape[0], torch.float32)
        delta = start_delta(shape[0], grad[0].numel(), torch.float32).reshape(shape)
        truth, lowp = expected(naive.pgd_step_, delta, grad, hyper, norm)
        pgd_step_(delta, grad, *hyper, norm, backend="reference")
        assert_close_to_reference(delta, truth, lowp, what=f"pgd_step_ {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("ok", [True, False])
def test_guarded_step_matches_the_definition(reference_path, dtype, norm, ok):
    """Non-finite rows keep their delta and are counted into ``skipped`` (from 5) when ``ok``; nothing
    changes, and nothing is counted, when not."""
    grad = gradient_rows(13, dtype)
    hyper = hyperparameters(grad.shape[0], dtype)
    delta = start_delta(*grad.shape, dtype)
    flag, skipped = torch.tensor(ok), torch.tensor(5)
    before = delta.clone()
    truth, lowp = expected(naive.guarded_pgd_step_, delta, grad, hyper, norm, flag, skipped)
    assert run_guarded_pgd_step_(delta, grad, *hyper, norm, flag, skipped, "reference") is delta
    assert_close_to_reference(delta, truth, lowp, what=f"guarded {norm} step (ok {ok})")
    assert skipped.item() == (5 + 4 if ok else 5), "four rows hold NaN or Inf"
    non_finite = ~torch.isfinite(grad).all(dim=1)
    unchanged = non_finite if ok else torch.ones_like(non_finite)
    assert torch.equal(delta[unchanged], before[unchanged])


def test_l2_projection_of_long_rows_stays_inside_eps_and_accurate(reference_path):
    """Rows of 65,536 float32 entries far outside the ball: the host kernel summed the norms one by one in
    float32 and left 12 of 16 classes up to 4e-6 above eps (the margin is 2^-19 ~ 1.9e-6), at 10x
    PyTorch's error; both paths sum the norm in float64 now."""
    torch.manual_seed(0)
    delta, grad = torch.randn(16, 64, 32, 32), torch.randn(16, 64, 32, 32)
    truth = delta.double()
    naive.pgd_step_(truth, grad.double(), *(per_class(v, 16, truth) for v in (0.1, 1.0, 1.0)), "l2")
    pgd_step_(delta, grad, 0.1, 1.0, 1.0, "l2", backend="reference")
    norms = delta.double().flatten(1).norm(dim=1)
    assert (norms <= 1.0).all(), f"{int((norms > 1).sum())} classes above eps, by up to {(norms.max() - 1):.2e}"
    # the projection's margin moves the radius by 2^-19, so the truth is scaled by the same factor
    torch.testing.assert_close(delta.double(), truth * (1 - 2.0**-19), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_l2_norm_of_huge_entries_does_not_overflow(reference_path, dtype):
    """A float32 row of entries near 1e19 (squares near 1e38) inside a ball of radius 1e25 is not projected:
    the norm overflowed float32 and scaled the row to zero."""
    delta = torch.tensor([[3e19, -4e19, 1e19]], dtype=dtype)
    grad = torch.tensor([[1.0, 2.0, 3.0]], dtype=dtype)
    expected = delta.double() + 0.1 * grad.double() / grad.double().norm()
    pgd_step_(delta, grad, 0.1, 1e25, 1.0, "l2", backend="reference")
    torch.testing.assert_close(delta.double(), expected, rtol=1e-7, atol=0)
