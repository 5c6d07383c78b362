"""The fused per-step ops (``lpa_kernels.step_update``) against their reference (``naive.py``) at odd
sizes: K = 1, 3, 10, 1000; empty and single-sample batches; absent classes, non-finite rows, labels out
of range; every direction/radius kind, with and without the trend update, float32 and float64."""

import pytest
import torch

from lpa_kernels._common import label_plan
from lpa_kernels.step_update import naive, op, plan as plan_module
from tests.helpers import KERNEL_TARGETS, assert_close_to_reference

SIZES = [(0, 3), (1, 1), (7, 3), (33, 10), (70, 1000), (300, 10)]


def _labels(batch, num_classes, bad, dtype, device):
    labels = torch.randint(0, num_classes, (batch,), dtype=dtype)
    if batch and bad == "high":
        labels[batch // 2] = num_classes + 2
    if batch and bad == "negative":
        labels[-1] = -5
    return labels.to(device)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("batch,num_classes", SIZES)
@pytest.mark.parametrize("bad", ["none", "high", "negative"])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_checked_label_plan_equals_reference(target, batch, num_classes, bad, label_dtype):
    backend, device = target
    torch.manual_seed(batch + num_classes)
    labels = _labels(batch, num_classes, bad, label_dtype, device)
    previous = torch.tensor([3, 4], device=device)  # an earlier bad batch's record
    expected_range, got_range = previous.clone(), previous.clone()
    safe, loss_labels, ok, plan = naive.checked_label_plan_(labels, num_classes, expected_range)
    got = plan_module.checked_labels(labels, num_classes, got_range, backend)
    for name, want, have in zip(("safe", "loss_labels", "ok", "plan"), (safe, loss_labels, ok, plan), got):
        assert have.dtype == want.dtype and torch.equal(have.cpu(), want.cpu()), name
    assert torch.equal(got_range.cpu(), expected_range.cpu())
    assert bool(ok) == (bad == "none" or batch == 0)
    assert torch.equal(plan.cpu(), label_plan(labels.clamp(0, num_classes - 1), num_classes).cpu())


# every small size with every kind of bad batch and label dtype; the largest batch (a full 4096-key sort, ~10 s
# in the interpreter) and a 2000-sample single class once each
SORTED_CASES = [(b, k, bad, dtype) for b, k in SIZES[1:] + [(1, 70000), (37, 70000)]
                for bad in ("none", "high", "negative") for dtype in (torch.int64, torch.int32)]
SORTED_CASES += [(4096, 3, "negative", torch.int32), (2000, 1, "high", torch.int64)]


# the sorted plan's Triton launches (the counter does not see the CUDA C++ extension's: its two are the same)
SORTED_PLAN_TRITON_LAUNCHES = {"triton": {"step_update._sorted_label_plan_kernel": 1, "step_update._class_starts_kernel": 1},
                               "cuda": {}}


@pytest.mark.parametrize("target", KERNEL_TARGETS)  # the CUDA C++ kernels on the CPU: tests/cuda (emulated)
@pytest.mark.parametrize("batch,num_classes,bad,label_dtype", SORTED_CASES)
def test_sorted_label_plan_equals_reference(target, batch, num_classes, bad, label_dtype, monkeypatch):
    """Above ``ONE_LAUNCH_PLAN_MAX`` (set to 0 here) and up to ``SORTED_PLAN_MAX_B`` samples the kernel
    backends sort the plan in two launches (one program or block for the check, the order and the segments, a
    grid for the class starts) and none of the definition's: the same tuple and record as the definition."""
    from lpa_bench.static.counting import LaunchCounter

    monkeypatch.setattr(plan_module, "ONE_LAUNCH_PLAN_MAX", 0)
    test_checked_label_plan_equals_reference(target, batch, num_classes, bad, label_dtype)
    backend, device = target
    labels = _labels(batch, num_classes, bad, label_dtype, device)
    with LaunchCounter() as counts:
        plan_module.checked_labels(labels, num_classes, torch.zeros(2, dtype=torch.int64, device=device), backend)
    summary = counts.summary()
    assert summary["triton"] == SORTED_PLAN_TRITON_LAUNCHES[backend]
    assert not {"argsort", "sort", "searchsorted", "cumsum"} & set(summary["aten"]), summary["aten"]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("sort", [False, True], ids=["one-launch", "sorted"])
def test_label_plan_op_passes_opcheck(target, sort):
    """The custom op behind both plan forms: its schema (``bad_range`` mutated), fake tensor and compiled
    dispatch (``torch.library.opcheck``), with a bad label so that the record is written."""
    backend, device = target
    labels = _labels(37, 11, "high", torch.int32, device)
    torch.library.opcheck(plan_module._checked_label_plan_op,
                          (labels, 11, torch.tensor([3, 4], device=device), backend, sort))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("sort", [False, True], ids=["one-launch", "sorted"])
def test_bad_batch_record_is_exact_at_the_int64_extremes(target, sort, monkeypatch):
    """The record of a bad batch is its labels' exact (min, max), labels near the int64 limits too (a neutral
    element of the range inside int64 would show through: padding lanes, a min's start value)."""
    backend, device = target
    monkeypatch.setattr(plan_module, "ONE_LAUNCH_PLAN_MAX", 0 if sort else plan_module.ONE_LAUNCH_PLAN_MAX)
    for values in ([2**62 + 5, 2**63 - 1, 2**62 + 9], [-(2**63), -(2**62) - 1], [2**63 - 1], [-(2**63)]):
        labels = torch.tensor(values, device=device)
        expected_range, got_range = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64, device=device)
        expected = naive.checked_label_plan_(labels.cpu(), 1000, expected_range)
        got = plan_module.checked_labels(labels, 1000, got_range, backend)
        assert all(torch.equal(h.cpu(), w) for h, w in zip(got, expected))
        assert got_range.tolist() == expected_range.tolist() == [min(values), max(values)]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_large_batches_by_classes_take_the_parallel_plan(target, monkeypatch):
    """Above ``ONE_LAUNCH_PLAN_MAX`` (B x K), with more samples than ``SORTED_PLAN_MAX_B``, no
    kernel builds the plan; the range check and the sorted plan come from the definition's ops, the same
    tuple and record."""
    backend, device = target
    monkeypatch.setattr(plan_module, "ONE_LAUNCH_PLAN_MAX", 33 * 10 - 1)
    monkeypatch.setattr(plan_module, "SORTED_PLAN_MAX_B", 32)
    monkeypatch.setattr(plan_module, "_checked_label_plan_op", lambda *a: pytest.fail("the one-launch kernel ran"))
    for bad in ("none", "high"):
        labels = _labels(33, 10, bad, torch.int32, device)
        expected_range, got_range = torch.tensor([3, 4], device=device), torch.tensor([3, 4], device=device)
        expected = naive.checked_label_plan_(labels, 10, expected_range)
        got = plan_module.checked_labels(labels, 10, got_range, backend)
        assert all(torch.equal(h.cpu(), w.cpu()) for h, w in zip(got, expected)) and torch.equal(got_range, expected_range)


def _log_probs(batch, num_classes, dtype, device, nonfinite):
    log_probs = torch.randn(batch, num_classes, dtype=torch.float64).log_softmax(dim=1)
    if nonfinite and batch > 2:
        log_probs[1] = float("nan")
        log_probs[2] = float("-inf")
    return log_probs.to(device, dtype)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("batch,num_classes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate,ok,nonfinite", [(False, True, False), (True, True, True), (True, False, True),
                                                     (False, False, False)])
def test_class_stats_equal_reference(target, batch, num_classes, dtype, accumulate, ok, nonfinite):
    backend, device = target
    torch.manual_seed(batch * 7 + num_classes)
    log_probs = _log_probs(batch, num_classes, dtype, device, nonfinite)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    start = torch.rand(3, num_classes, dtype=dtype, device=device)
    verdict = torch.tensor(ok, device=device)
    expected = naive.class_stats_(start.double().clone(), log_probs.double(), labels, verdict, accumulate)
    lowp = naive.class_stats_(start.clone(), log_probs, labels, verdict, accumulate)
    got = start.clone()
    op.class_stats_(got, log_probs, labels, verdict, accumulate, backend)
    assert_close_to_reference(got, expected, lowp, "class statistics")


def _stats(num_classes, dtype, device):
    """Class statistics with absent classes and (for K > 2) a class of non-finite sums."""
    counts = torch.randint(0, 4, (num_classes,)).to(dtype)
    p_sum = counts * torch.rand(num_classes, dtype=dtype)
    ce_sum = counts * torch.rand(num_classes, dtype=dtype) * 3
    if num_classes > 2:
        counts[1], p_sum[1], ce_sum[1] = 2, float("nan"), float("inf")
    return torch.stack([counts, p_sum, ce_sum]).to(device)


def _trend_state(num_classes, device):
    loss_ema = torch.rand(num_classes, dtype=torch.float64) * 2
    loss_ema[::3] = float("nan")  # not seen yet
    fall_ema = torch.where(loss_ema.isnan(), 0.0, torch.randn(num_classes, dtype=torch.float64) * 0.1)
    return loss_ema.to(device), fall_ema.to(device), torch.tensor(2, device=device)


POLICIES = [("fixed", "fixed"), ("confidence", "fixed"), ("confidence", "confidence"), ("fixed", "confidence_linear"),
            ("loss_trend", "confidence"), ("loss_trend", "fixed")]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("num_classes", [1, 3, 10, 1000])
@pytest.mark.parametrize("direction,radius", POLICIES)
@pytest.mark.parametrize("observe,clear", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_equals_reference(target, num_classes, direction, radius, observe, clear, dtype):
    backend, device = target
    torch.manual_seed(num_classes)
    stats = _stats(num_classes, dtype, device)
    fixed_direction = torch.randint(-1, 2, (num_classes,)).to(device, dtype)
    fixed_eps = (torch.rand(num_classes) + 0.5).to(device, dtype)
    params = (0.3, 0.7, 0.3e-6, 0.9)
    kernel_params = torch.tensor(params, dtype=torch.float64, device=device)
    states = [_trend_state(num_classes, device) for _ in range(2)]
    expected_state, got_state = ([t.clone() for t in s] for s in states[:1] * 2)
    expected_stats, got_stats = stats.clone(), stats.clone()
    expected = naive.policy_(expected_stats, fixed_direction, fixed_eps, *expected_state, params, direction, radius,
                             observe, clear, dtype)
    got = op.policy_(got_stats, fixed_direction, fixed_eps, *got_state, kernel_params, direction, radius, observe,
                     clear, dtype, backend)
    assert got[0].dtype == got[1].dtype == dtype
    assert torch.equal(got[0].cpu(), expected[0].cpu()), "direction"
    assert_close_to_reference(got[1], naive.policy_(stats.double(), fixed_direction.double(), fixed_eps.double(),
                                                    *[t.clone() for t in states[0]], params, direction, radius,
                                                    observe, False, torch.float64)[1], expected[1], "eps")
    for name, want, have in zip(("loss_ema", "fall_ema", "skipped"), expected_state, got_state):
        assert torch.allclose(have.cpu(), want.cpu(), rtol=1e-12, atol=0, equal_nan=True), name
    assert torch.equal(got_stats.cpu().nan_to_num(7.0), expected_stats.cpu().nan_to_num(7.0)), "statistics"


def test_reference_cases_are_not_vacuous():
    """The policy cases above see absent classes, a rejected class, classes on both sides of thr."""
    stats = _stats(10, torch.float64, "cpu")
    present, finite, p_c, _ = naive.class_means(stats)
    assert (~present).any() and (~finite).any() and present.sum() > 2
    loss_ema, fall_ema, skipped = _trend_state(10, "cpu")
    direction, _ = naive.policy_(stats.clone(), None, None, loss_ema, fall_ema, skipped,
                                 (0.3, 0.7, 1e-7, 0.9), "loss_trend", "confidence",
                                 True, False, torch.float64)
    assert set(direction.tolist()) >= {-1.0, 1.0} and skipped == 3
