"""``head_pgd_``'s class-space steps in one launch (``head_pgd/triton_fused.py``, and its CUDA twin
``csrc/head_pgd_fused.cu``) against the definition: several class blocks (K > 16, K not a multiple of 16),
absent classes, every GEMM dtype it serves, both norms, a NaN sample, whose NaN must reach its own class
only, and the training step's guard applied in the launch. A spy checks that the fused launch ran (the loop falls back to the launch-per-phase form silently
otherwise). The checks are shared with tests/cuda/test_emulated_kernels.py, which runs the CUDA kernel on
the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpa_kernels.head_pgd.cuda_kernels as cuda_kernels
import lpa_kernels.head_pgd.triton_kernels as triton_kernels
from lpa_kernels import head_pgd_
from lpa_kernels.head_pgd import loop
from lpa_kernels.head_pgd.op import run_head_pgd_
from tests.head_pgd.test_head_pgd import check_against_reference, definition, make_problem
from tests.helpers import KERNEL_TARGETS

GEMM_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(45, 1), (53, 17), (70, 40)]  # (batch, classes)
KERNEL_MODULES = {"triton": triton_kernels, "cuda": cuda_kernels}


def spy_on_fused_launch(monkeypatch, backend: str) -> list:
    """The class-space form whatever the sizes (add mode), and ``backend``'s fused launch wrapped in a spy:
    returns the list its calls are appended to."""
    module = KERNEL_MODULES[backend]
    calls, fused = [], module.KERNELS.fused_class_space

    def spy(*args):
        calls.append(args[1].shape)
        return fused.run(*args)

    monkeypatch.setattr(loop, "use_class_space", lambda *a: a[4] == "add")
    spied = loop.FusedClassSpace(fused.serves, spy)
    monkeypatch.setattr(module, "KERNELS", dataclasses.replace(module.KERNELS, fused_class_space=spied))
    return calls


def check_fused_steps(target, dtype, norm, batch, classes, monkeypatch, features=37) -> None:
    """Three fused steps (class 2 absent when K > 2) against the reference."""
    calls = spy_on_fused_launch(monkeypatch, target[0])
    h, y, weight, bias, delta = make_problem(batch, classes, features, dtype, target[1])
    if classes > 2:
        y[y == 2] = 0  # class 2 absent: it keeps its delta
    actual = check_against_reference(target, h, y, weight, bias, delta, 3, 0.1, 0.3, 1.0, norm, "add")
    assert calls, "the fused launch did not run"
    if classes > 2:
        assert torch.equal(actual[2], delta[2]), "the absent class's delta changed"


def check_nan_sample_reaches_its_own_class_only(target, monkeypatch) -> None:
    """A NaN sample of class 3 (in the same block of 16 classes as the others): class 3's delta becomes
    NaN, as in the definition, and every other class matches the definition."""
    calls = spy_on_fused_launch(monkeypatch, target[0])
    h, y, weight, bias, delta = make_problem(60, 20, 24, torch.float32, target[1])
    y[0] = 3
    h[0, 5] = float("nan")
    got = delta.clone()
    head_pgd_(h, y, weight, bias, got, 2, 0.1, 0.3, 1.0, "l2", "add", backend=target[0])
    assert calls, "the fused launch did not run"
    expected = delta.cpu().clone()
    definition(h.cpu(), y.cpu(), weight.cpu(), bias.cpu(), expected, 2, 0.1, 0.3, 1.0, "l2", "add")
    assert torch.isnan(got[3]).all() and torch.isnan(expected[3]).all()
    others = [c for c in range(20) if c != 3]
    torch.testing.assert_close(got.cpu()[others], expected[others], rtol=1e-4, atol=1e-5)


def check_guard_in_the_launch(target, monkeypatch, data_dtype, ok) -> None:
    """The training step's guard applied by the fused launch itself (``loop.guarded``'s rule, which must not
    run as torch ops here): a NaN sample of class 3 makes class 3's row NaN, which gets its previous value
    back bit for bit and is counted once; with ``ok`` False every row keeps its value and nothing is
    counted; the other rows as the definition. ``delta`` float32 (the iterate), the data in ``data_dtype``."""
    calls = spy_on_fused_launch(monkeypatch, target[0])
    monkeypatch.setattr(loop, "guarded", lambda *a: pytest.fail("the guard ran in torch ops around the fused launch"))
    h, y, weight, bias, delta = make_problem(60, 20, 24, data_dtype, target[1])
    delta = delta.float()
    y[0] = 3
    h[0, 5] = float("nan")
    per_class = lambda v: torch.full((20,), v, device=target[1])  # noqa: E731
    verdict = None if ok is None else torch.tensor(ok, device=target[1])
    got, skipped = delta.clone(), torch.tensor(5, device=target[1])
    run_head_pgd_(h, y, weight, bias, got, 2, per_class(0.1), per_class(0.3), per_class(1.0), "l2", "add", target[0],
                  None, verdict, skipped)
    assert calls, "the fused launch did not run"
    expected = delta.cpu().clone()
    definition(h.cpu(), y.cpu(), weight.cpu(), bias.cpu(), expected, 2, 0.1, 0.3, 1.0, "l2", "add")
    finite = torch.isfinite(expected).all(dim=1)
    assert not finite[3] and finite[[c for c in range(20) if c != 3]].all(), "test setup: class 3 alone non-finite"
    keep = finite & (ok is not False)
    assert torch.equal(got.cpu()[~keep], delta.cpu()[~keep]), "a guarded row did not get its previous value back"
    assert int(skipped) == 5 + (ok is not False), "the non-finite row of an ok batch is counted once"
    tolerance = dict(rtol=1e-4, atol=1e-5) if data_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got.cpu()[keep], expected[keep], **tolerance)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("data_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("ok", [None, True, False])
def test_the_fused_launch_applies_the_training_guard(target, data_dtype, ok, monkeypatch):
    check_guard_in_the_launch(target, monkeypatch, data_dtype, ok)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("batch, classes", SHAPES)
def test_fused_steps_match_the_reference(target, dtype, norm, batch, classes, monkeypatch):
    check_fused_steps(target, dtype, norm, batch, classes, monkeypatch)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_a_nan_sample_reaches_its_own_class_only(target, monkeypatch):
    check_nan_sample_reaches_its_own_class_only(target, monkeypatch)
