"""The training step's guarded PGD update (``run_guarded_pgd_step_``: non-finite classes keep their delta
and are counted, a batch whose labels failed the device check updates nothing) against its reference."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels.pgd import naive
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from tests.helpers import DTYPES, KERNEL_TARGETS, assert_close_to_reference
from tests.pgd.test_pgd import GRID_TARGETS, use_grid

NORMS = ("linf", "l2")


def problem(k, d, dtype, device):
    delta = (2 * torch.randn(k, d, device=device)).to(dtype)
    grad = torch.randn(k, d, device=device).to(dtype)
    grad[0, d // 2] = float("nan")
    grad[k // 2, 0] = float("inf")
    grad[k - 1] = 0  # a class absent from the batch
    step, eps = torch.rand(k, device=device) * 0.5, torch.rand(k, device=device) + 0.5
    direction = torch.where(torch.arange(k, device=device) % 2 == 0, 1.0, -0.5)
    return delta, grad, step, eps, direction


# The kernel detects non-finite entries by arithmetic on them (x - x): the CPU interpreter runs that
# through numpy, which warns; the compiled kernel computes the same values silently.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("ok", [True, False], ids=["ok", "bad-labels"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", GRID_TARGETS)
def test_guarded_step_matches_reference(target, dtype, norm, ok, monkeypatch):
    backend, device = use_grid(monkeypatch, target)
    k, d = 7, 1100  # D over one block of the one-program-per-class update
    delta, grad, step, eps, direction = problem(k, d, dtype, device)
    verdict = torch.tensor(ok, device=device)
    ref_skipped = torch.zeros((), dtype=torch.int64, device=device)
    per_class = [v.double() for v in (step, eps, direction)]
    ref = naive.guarded_pgd_step_(delta.double().clone(), grad.double(), *per_class, norm, verdict, ref_skipped)
    lowp = naive.pgd_step_(delta.clone(), naive.guarded_gradient(grad, verdict, torch.zeros_like(ref_skipped)),
                           step, eps, direction, norm)
    got, skipped = delta.clone(), torch.full((), 5, dtype=torch.int64, device=device)
    run_guarded_pgd_step_(got, grad, step, eps, direction, norm, verdict, skipped, backend)
    assert int(skipped) == 5 + (2 if ok else 0), "the two non-finite classes of an ok batch are counted"
    assert int(ref_skipped) == (2 if ok else 0)
    assert torch.isfinite(got).all(), "a non-finite gradient reached delta"
    kept = [0, k // 2, k - 1] if ok else list(range(k))
    assert torch.equal(got[kept], delta[kept]), "guarded classes must keep their delta bit for bit"
    if ok:
        assert not torch.equal(got[1], delta[1]), "a finite class of an ok batch must move"
    assert_close_to_reference(got, ref, lowp, what=f"guarded pgd step {norm} ({backend})")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # as above
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_guarded_step_is_the_pgd_step_custom_op_with_its_guard_arguments(target):
    """One custom op serves both steps: opcheck with and without ``ok``/``skipped``, and the guarded
    step under torch.compile(fullgraph=True) updates delta and the counter as in eager mode."""
    backend, device = target
    k, d = 5, 6
    delta, grad, step, eps, direction = problem(k, d, torch.float32, device)
    verdict = torch.tensor(True, device=device)
    op = torch.ops.lpa_kernels.pgd_step_
    torch.library.opcheck(op, (delta.clone(), grad, step, eps, direction, "l2", backend))
    torch.library.opcheck(op, (delta.clone(), grad, step, eps, direction, "l2", backend, verdict,
                               torch.zeros((), dtype=torch.int64, device=device)))

    def guarded(delta, skipped):
        return run_guarded_pgd_step_(delta, grad, step, eps, direction, "linf", verdict, skipped, backend)

    expected, expected_skipped = delta.clone(), torch.zeros((), dtype=torch.int64, device=device)
    guarded(expected, expected_skipped)
    torch._dynamo.reset()
    got, skipped = delta.clone(), torch.zeros((), dtype=torch.int64, device=device)
    torch.compile(guarded, fullgraph=True, backend="aot_eager")(got, skipped)
    assert int(skipped) == int(expected_skipped) == 2
    torch.testing.assert_close(got, expected)
