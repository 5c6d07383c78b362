"""The interpreter refuses grids a GPU would refuse (``tests/launch_limits.py``, installed by conftest.py)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lpa_kernels.backend import _old_interpreter_reason, interpreting
from tests.launch_limits import GRID_LIMITS

pytestmark = pytest.mark.skipif(not interpreting() or bool(_old_interpreter_reason()),
                                reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1, triton >= 3.9)")


@triton.jit
def _count_programs(out_ptr):
    tl.atomic_add(out_ptr, 1)


@pytest.mark.parametrize("grid", [(1, GRID_LIMITS[1] + 1), (1, 1, GRID_LIMITS[2] + 1), (GRID_LIMITS[0] + 1,)])
def test_a_grid_beyond_a_gpus_limits_is_refused_before_any_program_runs(grid):
    out = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="exceeds a GPU's launch limits"):
        _count_programs[grid](out)
    assert int(out) == 0


def test_a_grid_within_the_limits_runs_every_program():
    out = torch.zeros(1, dtype=torch.int32)
    _count_programs[(3, 2, 2)](out)
    assert int(out) == 12
