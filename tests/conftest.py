"""Test configuration shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported, so it is set here. ``LPA_POISON=1`` makes every kernel output
start as NaN, so a cell a kernel forgets to write fails the comparison with the reference. The
interpreter refuses grids a GPU would refuse (``tests/launch_limits.py``).
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

if interpreting():
    enforce_interpreter_grid_limits()


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
