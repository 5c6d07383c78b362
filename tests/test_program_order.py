"""The Triton kernels whose programs communicate give the same bits whatever order their programs run in.

On a GPU the programs of a launch finish in any order; the CPU interpreter runs them in index order,
so the last program to arrive at an arrival counter is always the highest chunk. Here every such
kernel also runs with its programs reversed and shuffled (``tests/program_order.py``) and must give,
bit for bit, what it gives in index order: the chunked class reduction (the last chunk adds the
partials in chunk order), the fused class gradient + PGD update (the last feature block of a class
updates its row) and its prepared form that ``head_pgd_`` repeats every step (counters the last
arrival resets), the guarded ``pgd_step`` on its split grid and the one-launch class-space ``head_pgd_``
(their skip counts). Correctness against the definitions is tested beside each op; these tests add
the order.
"""

from __future__ import annotations

import functools

import pytest
import torch
import triton
import triton.language as tl

import lpa_kernels
from lpa_kernels.backend import _old_interpreter_reason, interpreting
from lpa_kernels.pgd import triton_kernels as pgd_triton
from tests.perturb.test_perturb import LAYOUTS, random_inputs, reduction_chunk_plan
from tests.pgd.test_pgd import check_prepared_step_repeats_like_fresh_calls
from tests.order_cases import SHARED_CASES
from tests.program_order import ORDERS, interpreter_program_order

pytestmark = pytest.mark.skipif(not interpreting() or bool(_old_interpreter_reason()),
                                reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1, triton >= 3.9)")
PERMUTED = [order for order in ORDERS if order != "natural"]


def _long_tailed(counts: list[int]) -> torch.Tensor:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return labels[torch.randperm(labels.numel())]


def _assert_chunked(labels: torch.Tensor, num_classes: int, features, per_class, inner: int) -> None:
    """Test set-up: the reduction of these labels takes the chunked path (arrival counters)."""
    plan = reduction_chunk_plan(labels, num_classes, features, per_class, inner)
    assert plan is not None and int(plan[2].diff().max()) > 1, "test set-up: a class should be cut into chunks"


def perturb_backward_dominant_class(monkeypatch):
    """``perturb``'s backward (grad_h and the chunked class gradient), one class holding 50 of 53 samples."""
    features, per_class = LAYOUTS["full"]
    labels = _long_tailed([50, 3])
    _assert_chunked(labels, 3, features, per_class, 1)
    h, labels, delta, grad_out = random_inputs(53, 3, features, per_class, labels=labels)
    h.requires_grad_(), delta.requires_grad_()
    out = lpa_kernels.perturb(h, labels, delta, "scale", backend="triton")
    return torch.autograd.grad(out, (h, delta), grad_out)


def class_grad_long_tailed_channel(monkeypatch):
    """``class_grad`` on a channel-wise layout (slabs), long classes chunked, short ones written directly."""
    features, per_class = LAYOUTS["channel"]
    labels = _long_tailed([120, 12, 4, 2, 1, 1, 1, 1, 1, 1])
    _assert_chunked(labels, 11, features, per_class, 5 * 7)
    h, labels, _, grad_out = random_inputs(144, 11, features, per_class, labels=labels)
    return (lpa_kernels.class_grad(grad_out, labels, 11, (11, *per_class), h=h, mode="scale", backend="triton"),)


def class_grad_pgd_step_over_feature_blocks(monkeypatch):
    """The fused class gradient + L2 update: class 0 chunked, rows over several feature blocks, class 4
    absent; each class's last block to arrive updates the row."""
    labels = _long_tailed([60, 6, 2, 1])
    delta = 2 * torch.randn(5, 600)
    grad_out, h = torch.randn(2, 69, 2, 600)
    lpa_kernels.class_grad_pgd_step_(delta, grad_out, labels, 0.2, 0.8, -1.0, "l2", h=h, mode="scale", backend="triton")
    return (delta,)


CASES = {case.__name__: case for case in (perturb_backward_dominant_class, class_grad_long_tailed_channel,
                                           class_grad_pgd_step_over_feature_blocks)}
CASES.update({case.__name__: functools.partial(case, "triton") for case in SHARED_CASES})


def _run(case: str, monkeypatch) -> tuple:
    torch.manual_seed(0)  # the same inputs in every order
    return tuple(t.detach().clone() for t in CASES[case](monkeypatch))


# (guarded_pgd_step_split_grid: the kernel detects non-finite entries by arithmetic on them (x - x), which
# the interpreter runs through numpy, which warns; a compiled kernel computes the same values silently)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("order", PERMUTED)
@pytest.mark.parametrize("case", CASES)
def test_same_bits_in_any_program_order(case, order, monkeypatch):
    in_index_order = _run(case, monkeypatch)
    with interpreter_program_order(order):
        permuted = _run(case, monkeypatch)
    for i, (expected, got) in enumerate(zip(in_index_order, permuted)):
        assert torch.equal(expected, got), \
            f"{case}: output {i} changes with the programs in {order} order (largest difference " \
            f"{(expected - got).abs().max().item():.3e})"


@pytest.mark.parametrize("order", PERMUTED)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_prepared_step_repeats_like_fresh_calls_in_any_program_order(order, norm):
    """tests/pgd's check (three launches of one preparation equal three fresh calls bit for bit, and the
    float64 reference after them) with the programs out of index order."""
    with interpreter_program_order(order):
        check_prepared_step_repeats_like_fresh_calls(pgd_triton, (40, 7, 7), (40, 1, 1), norm, "cpu")


@triton.jit
def _arrival_kernel(out_ptr):
    """Program p writes into ``out[p]`` how many programs ran before it (``out[8]`` counts them)."""
    arrived = tl.load(out_ptr + 8)
    tl.store(out_ptr + tl.program_id(0), arrived)
    tl.store(out_ptr + 8, arrived + 1)


def test_the_order_reaches_the_programs():
    """The helper really permutes the programs, each exactly once."""
    arrivals = {}
    for order in ORDERS:
        out = torch.zeros(9, dtype=torch.int32)
        with interpreter_program_order(order):
            _arrival_kernel[(8,)](out)
        arrivals[order] = out[:8].tolist()
    assert arrivals["natural"] == list(range(8))
    assert arrivals["reversed"] == list(range(7, -1, -1))
    assert sorted(arrivals["shuffled"]) == list(range(8))
    assert arrivals["shuffled"] not in (arrivals["natural"], arrivals["reversed"])
