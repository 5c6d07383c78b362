"""CUDA's launch limits on Triton's CPU interpreter, so a grid a GPU would refuse fails here too.

A GPU launch takes at most 2^31 - 1 programs along the grid's x axis and 65535 along y and z; the
interpreter runs any grid. ``enforce_interpreter_grid_limits`` (installed once by conftest.py) makes
it refuse the rest with a ``ValueError``. The CUDA emulation checks its own launches (emulation/emu.h),
where the classes of the class reductions once ran along y and K = 100,000 did not launch.
"""

from __future__ import annotations

GRID_LIMITS = (2**31 - 1, 65535, 65535)


def enforce_interpreter_grid_limits() -> None:
    """From now on, the interpreter refuses a grid beyond ``GRID_LIMITS`` before running any program."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim = builder.set_grid_dim

    def set_grid_dim(nx, ny, nz):
        if any(n > limit for n, limit in zip((nx, ny, nz), GRID_LIMITS)):
            raise ValueError(f"Triton grid ({nx}, {ny}, {nz}) exceeds a GPU's launch limits {GRID_LIMITS}")
        set_dim(nx, ny, nz)

    builder.set_grid_dim = set_grid_dim
