"""``head_pgd_``'s rows form on the rows of the classes present (``loop.compacts``, ``loop.present_first``):
with fewer samples than classes and a large delta, the per-class state of the call (the iterate, the fused
update's workspace) has ``B`` rows instead of ``K``, and the result is the full form's bit for bit.

``COMPACT_MIN_ELEMENTS`` is lowered here so that small problems take that path on every backend (the
PyTorch kernels take it whenever B < K; ``_compacting`` switches that too). On the reference target
``LPA_HOST_KERNELS=0`` keeps float32 calls off the host C++ kernel (which runs the whole call itself) and
on the loop this file is about.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lpa_kernels.head_pgd.loop as head_loop
import lpa_kernels.head_pgd.torch_kernels as head_torch
from lpa_kernels import head_pgd_
from lpa_kernels.head_pgd import cost
from lpa_kernels.head_pgd.op import run_head_pgd_
from tests.head_pgd.test_head_pgd import TARGETS, check_against_reference, make_problem
from tests.head_pgd.test_head_pgd_memory import _LargestTensor
from tests.helpers import DTYPES

# B = 23 samples of 9 of K = 300 classes, D = 40 (so that K x D > B x K)
BATCH, CLASSES, FEATURES = 23, 300, 40
PRESENT = torch.tensor([0, 7, 31, 32, 150, 151, 298, 299, 64])


def _problem(dtype, device):
    labels = PRESENT[torch.randint(0, len(PRESENT), (BATCH,))]
    labels[: len(PRESENT)] = PRESENT  # every one of them present
    return make_problem(BATCH, CLASSES, FEATURES, dtype, device, labels=labels)


@pytest.fixture
def loop_only(monkeypatch):
    """The loop runs for every dtype (not the reference backend's host kernel)."""
    monkeypatch.setenv("LPA_HOST_KERNELS", "0")


def _compacting(monkeypatch, on: bool):
    """Every backend on the classes present (``on``) or on all K rows (the PyTorch kernels too, which
    otherwise compact whenever B < K)."""
    monkeypatch.setattr(head_loop, "COMPACT_MIN_ELEMENTS", 1 if on else 1 << 62)
    monkeypatch.setattr(head_torch, "KERNELS", dataclasses.replace(head_torch.KERNELS, updates_every_row=on))
    assert head_loop.compacts(BATCH, FEATURES, CLASSES) == on


def test_present_first_lists_present_then_absent_classes_and_each_labels_slot():
    labels = torch.tensor([5, 2, 5, 9, 2], dtype=torch.int32)
    classes, slots = head_loop.present_first(labels, 10, 5)
    assert classes.tolist() == [2, 5, 9, 0, 1]  # present in order, then absent ones as padding
    assert slots.tolist() == [1, 0, 1, 2, 0] and slots.dtype == torch.int64
    assert torch.equal(classes[slots], labels.long())


def test_compaction_rule():
    assert head_loop.compacts(4096, 4096, 32_000) and head_loop.compacts(4096, 4096, 100_000)
    assert not head_loop.compacts(1024, 2048, 1000)  # more samples than classes
    assert not head_loop.compacts(128, 640, 1000)  # a small delta: the set-up launches would cost more


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode, norm, direction", [("add", "l2", "confidence"), ("scale", "linf", -1.0),
                                                   ("add", "linf", 1.0), ("scale", "l2", "confidence")])
def test_rows_of_the_classes_present_equal_the_full_rows(target, dtype, mode, norm, direction, loop_only,
                                                         monkeypatch):
    """The compacted call matches the reference, equals the full call bit for bit, and leaves every absent
    class's row as it was (291 of 300)."""
    check_compacted(target, dtype, mode, norm, direction, monkeypatch)


def check_compacted(target, dtype, mode, norm, direction, monkeypatch):
    """``test_rows_of_the_classes_present_equal_the_full_rows`` on ``target`` (also run by the CUDA
    emulation, tests/cuda/test_emulated_kernels.py)."""
    problem = _problem(dtype, target[1])
    assert not head_loop.use_class_space(BATCH, FEATURES, CLASSES, 2, mode, dtype, target[1] == "cuda")
    args = dict(steps=2, step_size=0.1, eps=0.3, direction=direction, norm=norm, mode=mode)
    _compacting(monkeypatch, True)
    compact = check_against_reference(target, *problem, **args)
    _compacting(monkeypatch, False)
    full = check_against_reference(target, *problem, **args)
    assert torch.equal(compact, full), "the compacted rows form differs from the full one"
    absent = torch.ones(CLASSES, dtype=torch.bool)
    absent[PRESENT] = False
    assert torch.equal(compact[absent.to(compact.device)], problem[-1][absent.to(compact.device)])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("ok", [True, False])
# the interpreter's numpy warns about the present class's infinite logits (the kernels' outputs are guarded)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_the_training_guard_is_unchanged(target, ok, loop_only, monkeypatch):
    """Under the training step's guard (``ok``, ``skipped``), with a non-finite row in an absent class gathered
    as padding (class 1, the first absent one), in an absent class left out (297) and in a present class
    (298: its logits and update are not finite): the compacted call, which guards only the rows it gathers,
    restores and counts exactly what the full call does (its guard covers all of delta), and creates no
    (K, D) copy for it."""
    check_guard(target, ok, monkeypatch)


def check_guard(target, ok, monkeypatch):
    """``test_the_training_guard_is_unchanged`` on ``target`` (also run by the CUDA emulation)."""
    h, y, weight, bias, start = _problem(torch.float32, target[1])
    assert 1 not in PRESENT and 297 not in PRESENT and 298 in PRESENT
    start[1] = float("nan")
    start[297, 3] = float("inf")
    start[298, 5] = float("-inf")
    results, largest = [], {}
    for on in (True, False):
        _compacting(monkeypatch, on)
        delta = start.clone()
        skipped = torch.zeros((), dtype=torch.int64, device=delta.device)
        per_class = lambda value: torch.full((CLASSES,), value, device=delta.device)  # noqa: E731
        arguments = per_class(0.1), per_class(0.3), per_class(1.0), torch.tensor(ok, device=delta.device)
        with _LargestTensor() as seen:
            run_head_pgd_(h, y, weight, bias, delta, 2, *arguments[:3], "l2", "add", target[0], None, arguments[3],
                          skipped)
        results.append((delta, int(skipped)))
        largest[on] = seen.largest
    (compact, compact_skipped), (full, full_skipped) = results
    assert torch.equal(compact.nan_to_num(), full.nan_to_num()) and compact_skipped == full_skipped == 3 * ok
    if target[0] == "reference":  # a dispatch mode sees no further into the fast backends' ops
        assert largest[True] <= BATCH * CLASSES < CLASSES * FEATURES <= largest[False], largest


@pytest.mark.parametrize("target", TARGETS[:1])  # a dispatch mode sees no further into the fast backends' ops
def test_no_classes_by_features_state(target, loop_only, monkeypatch):
    """16-bit delta (its iterate in float32): the full call creates a (K, D) tensor, the compacted one
    nothing larger than the (B, K) logits. (On a GPU, tests/head_pgd/test_head_pgd_memory.py checks the
    allocator's peak of every backend against ``loop.workspace_bytes``, which counts the compacted state.)"""
    h, y, weight, bias, start = _problem(torch.bfloat16, target[1])
    largest = {}
    for on in (True, False):
        _compacting(monkeypatch, on)
        delta = start.clone()
        with _LargestTensor() as seen:
            head_pgd_(h, y, weight, bias, delta, 2, 0.1, 0.3, "confidence", "l2", "add", backend=target[0])
        largest[on] = seen.largest
    assert largest[False] >= CLASSES * FEATURES
    assert largest[True] <= BATCH * CLASSES < CLASSES * FEATURES, largest


@pytest.mark.parametrize("target", TARGETS[1:2])  # Triton (the counter does not see the CUDA C++ launches)
def test_compaction_costs_its_modelled_launches_once_per_call(target, monkeypatch):
    """The compacted call launches ``cost.COMPACT_LAUNCHES`` more than the full one, whatever its steps."""
    from lpa_bench.static.counting import LaunchCounter

    monkeypatch.setenv("LPA_POISON", "0")  # poisoning fills every new buffer: a launch that training never has
    h, y, weight, bias, start = _problem(torch.float32, target[1])
    launches = {}
    for on in (True, False):
        _compacting(monkeypatch, on)
        for steps in (1, 3):
            delta = start.clone()
            with LaunchCounter() as counter:
                head_pgd_(h, y, weight, bias, delta, steps, 0.1, 0.3, "confidence", "l2", "add", backend=target[0])
            launches[on, steps] = counter.summary()["aten_launches"] + counter.summary()["triton_launches"]
    assert launches[True, 3] - launches[True, 1] == launches[False, 3] - launches[False, 1], launches
    assert launches[True, 1] - launches[False, 1] == cost.COMPACT_LAUNCHES, launches
    setup = cost.rows_setup(BATCH, FEATURES, 4, True)
    assert len(setup) == cost.ROWS_PREPARATION_LAUNCHES + cost.COMPACT_LAUNCHES


def test_cost_model_moves_the_16_bit_iterate_of_the_rows_it_keeps():
    """The model's set-up casts a 16-bit delta's iterate to float32 and rounds it back: (K, D) for the full
    rows form, (B, D) compacted; nothing for float32."""
    B, D, K = 4096, 4096, 32_000
    rows = head_loop.chunk_rows(B, K)
    for compact, state in ((False, K), (True, B)):
        full = cost.form_kernels(False, B, D, K, 2, rows, compact)[0]
        assert full[-2:] == [(state * D * (2 + 4), 0)] * 2
        assert cost.form_kernels(False, B, D, K, 4, rows, compact)[0] == cost.rows_setup(B, D, 4, compact)
    assert (cost.call_seconds(False, B, D, K, 3, 2, rows, True) < cost.call_seconds(False, B, D, K, 3, 2, rows, False))
    setup = cost.form_kernels(True, 1024, 2048, 1000, 2, head_loop.chunk_rows(1024, 1000))[0]
    assert setup[-1] == (1000 * 2048 * 6, 0) and len(setup) == 2  # class space: the cast in, no copy back


def test_the_pytorch_kernels_run_on_the_classes_present_whenever_b_is_below_k(loop_only, monkeypatch):
    """Their update costs K rows whatever the classes present (``updates_every_row``), so they compact at any
    size with B < K (here far below ``COMPACT_MIN_ELEMENTS``), and not with B >= K."""
    calls = []
    present_first = head_loop.present_first
    monkeypatch.setattr(head_loop, "present_first", lambda *a: calls.append(a[1:]) or present_first(*a))
    assert not head_loop.compacts(BATCH, FEATURES, CLASSES)
    h, y, weight, bias, delta = _problem(torch.bfloat16, "cpu")
    head_pgd_(h, y, weight, bias, delta, 1, 0.1, 0.3, 1.0, "l2", "add", backend="reference")
    assert calls == [(CLASSES, BATCH)]
    h, y, weight, bias, delta = make_problem(BATCH, 20, FEATURES, torch.bfloat16)
    head_pgd_(h, y, weight, bias, delta, 1, 0.1, 0.3, 1.0, "l2", "scale", backend="reference")
    assert len(calls) == 1
