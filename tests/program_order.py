"""Run a launch's programs in another order than the CPU stand-ins' usual one.

Triton's interpreter runs a grid's programs one after another in index order, and so does the CUDA
emulation (``tests/cuda/emulation/emu.h``) with its blocks. A GPU runs them concurrently and finishes
them in any order, so a kernel whose programs communicate (an arrival counter whose last program
combines the others' partial sums, a counter the last one resets for the next launch) is tested on the
CPU in one order only. These helpers run every program exactly once but in a permuted order, so the
tests can check that such kernels give the same result, bit for bit, whichever program comes last.
They do not reproduce concurrency: memory-model races are for the GPU tests and compute-sanitizer.

Orders: ``natural`` (index order), ``reversed``, ``shuffled`` (a fixed seeded permutation). The cases
both backends' order tests run are in ``tests/order_cases.py`` (this module stays free of the ops and the
test modules: conftest.py imports it).
"""

from __future__ import annotations

import contextlib
import os
import random

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
