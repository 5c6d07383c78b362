"""The cases both backends' program-order tests run (``tests/test_program_order.py`` on the Triton
interpreter, ``tests/cuda/test_emulated_block_order.py`` on the CUDA emulation): ``case(backend, monkeypatch)
-> outputs``, the same inputs for the same seed, compared bit for bit across orders (``tests/program_order.py``)."""

from __future__ import annotations

import torch

import lpa_kernels
from lpa_kernels.head_pgd import loop as head_loop
from lpa_kernels.pgd import cuda_kernels as pgd_cuda
from lpa_kernels.pgd import triton_kernels as pgd_triton
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from tests.head_pgd.test_fused_class_space import spy_on_fused_launch
from tests.head_pgd.test_head_pgd import make_problem

_PGD_LAUNCHERS = {"triton": pgd_triton, "cuda": pgd_cuda}


def guarded_pgd_step_split_grid(backend: str, monkeypatch) -> tuple:
    """The guarded L2 step on the (feature tile, class) grid of 64-entry tiles, two classes not finite
    (counted into the skip count by their first tile)."""
    monkeypatch.setattr(_PGD_LAUNCHERS[backend], "split_block", lambda K, D, device: 64)
    delta, grad = 0.3 * torch.randn(5, 301), torch.randn(5, 301)
    grad[2, 5], grad[3, 7] = float("nan"), float("inf")
    step, eps, direction = torch.rand(5) * 0.2, torch.rand(5) + 0.1, torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5])
    skipped = torch.zeros((), dtype=torch.int64)
    run_guarded_pgd_step_(delta, grad, step, eps, direction, "l2", torch.tensor(True), skipped, backend)
    return delta, skipped


def head_pgd_rows_form(backend: str, monkeypatch) -> tuple:
    """Three rows-form steps: the prepared fused update launched three times (its counters must come back
    to zero whichever program arrives last)."""
    monkeypatch.setattr(head_loop, "use_class_space", lambda *args: False)
    h, y, weight, bias, delta = make_problem(40, 13, 37)
    lpa_kernels.head_pgd_(h, y, weight, bias, delta, 3, 0.1, 0.3, "confidence", "l2", "add", backend=backend)
    return (delta,)


def head_pgd_fused_class_space(backend: str, monkeypatch) -> tuple:
    """Every class-space step in one launch (three programs of 16 classes)."""
    calls = spy_on_fused_launch(monkeypatch, backend)
    h, y, weight, bias, delta = make_problem(70, 40, 37)
    lpa_kernels.head_pgd_(h, y, weight, bias, delta, 3, 0.1, 0.3, 1.0, "l2", "add", backend=backend)
    assert calls, "test set-up: the fused launch should run"
    return (delta,)


SHARED_CASES = (guarded_pgd_step_split_grid, head_pgd_rows_form, head_pgd_fused_class_space)
