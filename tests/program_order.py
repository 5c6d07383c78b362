"""Run a launch's programs in another order than the CPU stand-ins' usual one.

Triton's interpreter runs a grid's programs one after another in index order, and so does the CUDA
emulation (``tests/cuda/emulation/emu.h``) with its blocks. A GPU runs them concurrently and finishes
them in any order, so a kernel whose programs communicate (an arrival counter whose last program
combines the others' partial sums, a counter the last one resets for the next launch) is tested on the
CPU in one order only. These helpers run every program exactly once but in a permuted order, so the
tests can check that such kernels give the same result, bit for bit, whichever program comes last.
They do not reproduce concurrency: memory-model races are for the GPU tests and compute-sanitizer.

Orders: ``natural`` (index order), ``reversed``, ``shuffled`` (a fixed seeded permutation). The cases
both backends' order tests run (``tests/test_program_order.py``, ``tests/cuda/test_emulated_block_order.py``)
are at the end.
"""

from __future__ import annotations

import contextlib
import os
import random

import torch

import lpa_kernels
from lpa_kernels.head_pgd import loop as head_loop
from lpa_kernels.pgd import cuda_kernels as pgd_cuda
from lpa_kernels.pgd import triton_kernels as pgd_triton
from lpa_kernels.pgd.op import run_guarded_pgd_step_
from tests.head_pgd.test_fused_class_space import spy_on_fused_launch
from tests.head_pgd.test_head_pgd import make_problem

ORDERS = ("natural", "reversed", "shuffled")
SHUFFLE_SEED = 1234
# The CUDA emulation's switch (read by emu.h at each launch): unset, "reversed" or "shuffled:<seed>".
EMULATION_ORDER_VARIABLE = "LPA_EMU_BLOCK_ORDER"


def permutation(count: int, order: str) -> list[int]:
    """The position in index order of the program run ``i``-th, for ``count`` programs."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    indices = list(range(count))
    if order == "reversed":
        indices.reverse()
    elif order == "shuffled":
        random.Random(SHUFFLE_SEED + count).shuffle(indices)
    return indices


@contextlib.contextmanager
def interpreter_program_order(order: str):
    """Within the block, Triton's interpreter runs each grid's programs in ``order``. Its grid loop visits
    ``(x, y, z)`` in index order and sets the program id through the interpreter's builder before each
    program; the builder here maps the ``i``-th visit through ``permutation`` instead."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_index = builder.set_grid_dim, builder.set_grid_idx
    grid = {}

    def set_grid_dim(nx, ny, nz):
        grid.update(shape=(nx, ny, nz), order=permutation(nx * ny * nz, order))
        set_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        _, ny, nz = grid["shape"]
        flat = grid["order"][(x * ny + y) * nz + z]
        set_index(flat // (ny * nz), flat // nz % ny, flat % nz)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_index


@contextlib.contextmanager
def emulated_block_order(order: str):
    """Within the block, the CUDA emulation runs each launch's blocks in ``order`` (through its
    environment switch, which ``emu.h`` reads at every launch)."""
    permutation(1, order)  # validates the name
    value = {"natural": None, "reversed": "reversed", "shuffled": f"shuffled:{SHUFFLE_SEED}"}[order]
    previous = os.environ.get(EMULATION_ORDER_VARIABLE)
    _set(value)
    try:
        yield
    finally:
        _set(previous)


def _set(value: str | None) -> None:
    if value is None:
        os.environ.pop(EMULATION_ORDER_VARIABLE, None)
    else:
        os.environ[EMULATION_ORDER_VARIABLE] = value


# ----- cases both backends run in every order: ``case(backend, monkeypatch) -> outputs`` ---------------
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
