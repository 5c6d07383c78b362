"""``head_pgd_``'s class-space steps in one Triton launch (``head_pgd/triton_fused.py``) against the
definition: several class blocks (K > 16, K not a multiple of 16), absent classes, every GEMM dtype it
serves, both norms, and a NaN sample, whose NaN must reach its own class only. A spy checks that the
fused launch ran (the loop falls back to the launch-per-phase form silently otherwise)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpa_kernels.head_pgd.triton_fused as triton_fused
import lpa_kernels.head_pgd.triton_kernels as triton_kernels
from lpa_kernels import head_pgd_
from lpa_kernels.head_pgd import loop
from tests.head_pgd.test_head_pgd import check_against_reference, definition, make_problem
from tests.helpers import KERNEL_TARGETS

TRITON = [t for t in KERNEL_TARGETS if t.values[0][0] == "triton"]


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    run = triton_fused.class_space_steps

    def spy(*args):
        calls.append(args[1].shape)
        return run(*args)

    monkeypatch.setattr(loop, "use_class_space", lambda *a: a[3] == "add")  # class space whatever the sizes
    fused = loop.FusedClassSpace(triton_fused.serves, spy)
    monkeypatch.setattr(triton_kernels, "KERNELS", dataclasses.replace(triton_kernels.KERNELS, fused_class_space=fused))
    return calls


@pytest.mark.parametrize("target", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("batch, classes", [(45, 1), (53, 17), (70, 40)])
def test_fused_steps_match_the_reference(target, dtype, norm, batch, classes, fused_calls):
    h, y, weight, bias, delta = make_problem(batch, classes, 37, dtype, target[1])
    if classes > 2:
        y[y == 2] = 0  # class 2 absent: it keeps its delta
    check_against_reference(target, h, y, weight, bias, delta, 3, 0.1, 0.3, 1.0, norm, "add")
    assert fused_calls, "the fused launch did not run"


@pytest.mark.parametrize("target", TRITON)
def test_a_nan_sample_reaches_its_own_class_only(target, fused_calls):
    """A NaN sample of class 3 (in the same block of 16 classes as the others): class 3's delta becomes
    NaN, as in the definition, and every other class matches the definition."""
    h, y, weight, bias, delta = make_problem(60, 20, 24, torch.float32, target[1])
    y[0] = 3
    h[0, 5] = float("nan")
    got = delta.clone()
    head_pgd_(h, y, weight, bias, got, 2, 0.1, 0.3, 1.0, "l2", "add", backend=target[0])
    assert fused_calls, "the fused launch did not run"
    expected = delta.cpu().clone()
    definition(h.cpu(), y.cpu(), weight.cpu(), bias.cpu(), expected, 2, 0.1, 0.3, 1.0, "l2", "add")
    assert torch.isnan(got[3]).all() and torch.isnan(expected[3]).all()
    others = [c for c in range(20) if c != 3]
    torch.testing.assert_close(got.cpu()[others], expected[others], rtol=1e-4, atol=1e-5)
