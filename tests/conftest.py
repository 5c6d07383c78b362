"""Test configuration shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported, so it is set here. ``LPA_POISON=1`` makes every kernel output
start as NaN, so a cell a kernel forgets to write fails the comparison with the reference. The
interpreter refuses grids a GPU would refuse (``tests/launch_limits.py``). ``LPA_TEST_PROGRAM_ORDER``
(``reversed``, ``shuffled``) runs the suite with every launch's programs out of index order.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LPA_POISON", "1")

import pytest  # noqa: E402

from lpa_kernels.backend import interpreting  # noqa: E402
from tests.helpers import KERNEL_TARGETS  # noqa: E402,F401
from tests.launch_limits import enforce_interpreter_grid_limits  # noqa: E402
from tests.program_order import ORDERS, emulated_block_order, interpreter_program_order  # noqa: E402

if interpreting():
    enforce_interpreter_grid_limits()
# LPA_TEST_PROGRAM_ORDER=reversed or shuffled: every test runs each Triton launch's programs (interpreter)
# and each emulated CUDA launch's blocks in that order (tests/program_order.py); unset: index order.
PROGRAM_ORDER = os.environ.get("LPA_TEST_PROGRAM_ORDER", "natural")
if PROGRAM_ORDER not in ORDERS:
    raise ValueError(f"LPA_TEST_PROGRAM_ORDER must be one of {ORDERS}, got {PROGRAM_ORDER!r}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _program_order():
    if PROGRAM_ORDER == "natural" or not interpreting():
        yield
        return
    with interpreter_program_order(PROGRAM_ORDER), emulated_block_order(PROGRAM_ORDER):
        yield
