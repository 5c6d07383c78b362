"""The CUDA kernels whose blocks communicate give the same bits whatever order their blocks run in.

The CUDA emulation runs a launch's blocks one after another in index order; a GPU finishes them in any
order. Here the kernels with arrival counters run with their blocks reversed and shuffled as well
(``tests/program_order.py``, through the emulation's ``LPA_EMU_BLOCK_ORDER``) and must give, bit for
bit, what they give in index order: ``class_grad_pgd_step`` (the last sample split of a (class, tile)
adds the splits' partials, the last tile of a class updates its row) and its prepared form that
``head_pgd_``'s rows form repeats every step (counters the last arrival resets), the split class
reduction of ``perturb``'s backward, the guarded ``pgd_step`` (its skip count) and the one-launch
class-space ``head_pgd_``. Correctness against the definitions: ``test_emulated_kernels.py``.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lpa_kernels import _cuda_launch
from tests.cuda.test_emulated_kernels import pytestmark  # noqa: F401 (the same skip: g++ and the CUDA headers)
from tests.helpers import make_labels
from tests.pgd.test_pgd import check_prepared_step_repeats_like_fresh_calls
from tests.order_cases import SHARED_CASES
from tests.program_order import ORDERS, emulated_block_order

PERMUTED = [order for order in ORDERS if order != "natural"]


def perturb_backward_split(launchers, monkeypatch):
    """One class of 300 samples: the reduction's sample splits, combined in split order."""
    grad_out, labels = torch.randn(300, 6), torch.zeros(300, dtype=torch.int64)
    assert launchers.reduce_splits(torch.device("cpu"), 1, 6, 1, 300, 4) > 1, "test set-up: the reduction should split"
    return launchers.perturb_backward(grad_out, None, labels, None, 1, 6, 1, "add", False, torch.float32)[1:]


def class_grad_pgd_step_split(launchers, monkeypatch):
    """300 samples of 3 classes over 3 sample splits, rows of 216 over several tiles; l2, scale mode."""
    monkeypatch.setattr(_cuda_launch, "reduce_splits", lambda *args: 3)
    grad_out, h = torch.randn(2, 300, 216)
    labels, delta = make_labels(300, 3), 0.2 * torch.randn(3, 216)
    step, eps, direction = torch.tensor([0.05, 0.1, 0.2]), torch.tensor([0.3, 0.2, 0.4]), torch.tensor([1.0, -1.0, 1.0])
    launchers.class_grad_pgd_step(delta, grad_out, labels, h, step, eps, direction, 1, "scale", "l2")
    return (delta,)


CASES = {case.__name__: case for case in (perturb_backward_split, class_grad_pgd_step_split)}


def _on_cuda(case):
    """A case both backends run (``tests/program_order.py``), on the emulated CUDA backend."""
    return lambda launchers, monkeypatch: case("cuda", monkeypatch)


CASES.update({case.__name__: _on_cuda(case) for case in SHARED_CASES})


def _run(case: str, launchers, monkeypatch) -> tuple:
    torch.manual_seed(0)  # the same inputs in every order
    return tuple(t.clone() for t in CASES[case](launchers, monkeypatch))


@pytest.mark.parametrize("order", PERMUTED)
@pytest.mark.parametrize("case", CASES)
def test_same_bits_in_any_block_order(cuda_backend_on_cpu, launchers, monkeypatch, case, order):
    in_index_order = _run(case, launchers, monkeypatch)
    with emulated_block_order(order):
        permuted = _run(case, launchers, monkeypatch)
    for i, (expected, got) in enumerate(zip(in_index_order, permuted)):
        assert torch.equal(expected, got), f"{case}: output {i} changes with the blocks in {order} order"


@pytest.mark.parametrize("order", PERMUTED)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_prepared_step_repeats_like_fresh_calls_in_any_block_order(launchers, monkeypatch, order, norm):
    """tests/pgd's check (three launches of one preparation equal three fresh calls bit for bit, and the
    float64 reference after them) over 3 sample splits, with the blocks out of index order."""
    monkeypatch.setattr(_cuda_launch, "reduce_splits", lambda *args: 3)
    with emulated_block_order(order):
        check_prepared_step_repeats_like_fresh_calls(launchers, (40, 7, 7), (40, 1, 1), norm, "cpu")


def _visit_order(emulated, blocks: int) -> list[int]:
    """The block each step of an emulated launch of ``blocks`` blocks runs (emulation/order_probe.cpp)."""
    probe = ctypes.CDLL(emulated.__file__).lpa_emu_visit_order
    visited = (ctypes.c_uint * blocks)()
    probe(ctypes.c_uint(blocks), visited)
    return list(visited)


def test_the_order_reaches_the_blocks(emulated):
    """The switch really permutes a launch's blocks, each exactly once; an unknown order raises."""
    seen = {}
    for order in ORDERS:
        with emulated_block_order(order):
            seen[order] = _visit_order(emulated, 8)
    assert seen["natural"] == list(range(8))
    assert seen["reversed"] == list(range(7, -1, -1))
    assert sorted(seen["shuffled"]) == list(range(8)) and seen["shuffled"] not in (seen["natural"], seen["reversed"])
    with pytest.raises(ValueError, match="order must be one of"):
        with emulated_block_order("sideways"):
            pass
