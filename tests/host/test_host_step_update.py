"""The class statistics and the built-in policies (``step_update``) on the reference backend's two CPU
paths (the host C++ kernels and the PyTorch ops, the ``reference_path`` fixture) against
``step_update/naive.py``: odd class counts and batches (empty included), rejected batches, non-finite
log-probabilities and class sums, absent classes, all-zero confidence gaps, int32/int64 labels,
float32/float64, every direction x radius kind with and without the trend update and the clearing."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import _host_ext
from lpa_kernels.step_update import naive, op
from tests.helpers import assert_close_to_reference

DTYPES = (torch.float32, torch.float64)
CLASSES = (1, 7, 33)
BATCHES = (0, 1, 37)
NAN, INF = float("nan"), float("inf")
PARAMS = (0.3, 0.7, 0.3e-6, 0.9)  # naive.PARAMS: eps, delta_eps, min_radius, momentum


def log_probs_of(batch, classes, dtype, nonfinite):
    """``(B, K)`` log-softmax rows; with ``nonfinite`` (B > 2) a NaN row and a row of -Inf."""
    log_probs = torch.randn(batch, classes, dtype=torch.float64).log_softmax(dim=1)
    if nonfinite and batch > 2:
        log_probs[1] = NAN
        log_probs[2] = -INF
    return log_probs.to(dtype)


def assert_same(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("verdict", [None, True, False], ids=["ok-none", "ok", "rejected"])
def test_class_stats_match_the_definition(reference_path, dtype, label_dtype, verdict):
    ok = None if verdict is None else torch.tensor(verdict)
    for classes in CLASSES:
        for batch in BATCHES:
            torch.manual_seed(classes * 100 + batch)
            log_probs = log_probs_of(batch, classes, dtype, nonfinite=verdict is not None)
            labels = torch.randint(0, classes, (batch,), dtype=label_dtype)
            start = torch.rand(3, classes, dtype=dtype)
            start[:, 0] = NAN  # an earlier micro-batch's NaN stays NaN when accumulating
            for accumulate in (False, True):
                what = f"class statistics K={classes} B={batch} accumulate={accumulate}"
                got = start.clone()
                bound = op.class_stats_(got, log_probs, labels, ok, accumulate, "reference")
                assert (bound is not None) == (reference_path.name == "host")
                if verdict is False:  # a rejected batch: unchanged when accumulating, zero when not
                    assert_same(got, start if accumulate else torch.zeros_like(start), what)
                    continue
                truth = naive.class_stats_(start.double(), log_probs.double(), labels, ok, accumulate)
                lowp = naive.class_stats_(start.clone(), log_probs, labels, ok, accumulate)
                assert_close_to_reference(got, truth, lowp, what)


def test_class_stats_of_labels_out_of_range_take_the_pytorch_path(reference_path):
    """The host kernel writes nothing for a label outside ``[0, K)``; the PyTorch ops then raise."""
    stats = torch.ones(3, 4)
    with pytest.raises((IndexError, RuntimeError)):
        op.class_stats_(stats, log_probs_of(3, 4, torch.float32, False), torch.tensor([0, 4, 1]), None, True,
                        "reference")
    assert stats.eq(1).all()


def policy_stats(classes, dtype, case):
    """``(3, K)`` class statistics: "mixed" (absent classes, for K > 2 a class with a NaN sum and one with
    an Inf sum), "equal" (every class present with the same mean p_true: every gap is 0) or "absent"."""
    if case == "absent":
        return torch.zeros(3, classes, dtype=dtype)
    counts = torch.randint(0, 4, (classes,)).to(torch.float64) if case == "mixed" else torch.full((classes,), 2.0)
    counts[0] = 3  # one class present at least
    p_sum = counts * (torch.rand(classes, dtype=torch.float64) if case == "mixed" else 0.375)
    ce_sum = counts * torch.rand(classes, dtype=torch.float64) * 3
    if case == "mixed" and classes > 2:
        counts[1], p_sum[1] = 2, NAN
        counts[2], ce_sum[2] = 1, INF
    return torch.stack([counts, p_sum, ce_sum]).to(dtype)


def trend_state(classes):
    """``(loss_ema, fall_ema, skipped)``: some classes not seen yet (NaN loss_ema)."""
    loss_ema = torch.rand(classes, dtype=torch.float64) * 2
    loss_ema[1::3] = NAN
    fall_ema = torch.where(loss_ema.isnan(), 0.0, torch.randn(classes, dtype=torch.float64) * 0.1)
    return loss_ema, fall_ema, torch.tensor(2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("observe,clear", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("radius", list(naive.RADII))
@pytest.mark.parametrize("direction", list(naive.DIRECTIONS))
def test_policy_matches_the_definition(reference_path, direction, radius, observe, clear, dtype):
    for classes in CLASSES:
        for case in ("mixed", "equal", "absent"):
            torch.manual_seed(classes)
            what = f"policy {direction}/{radius} K={classes} {case}"
            stats = policy_stats(classes, dtype, case)
            fixed_direction = torch.randint(-1, 2, (classes,)).to(dtype)
            fixed_eps = (torch.rand(classes) + 0.5).to(dtype)
            state = trend_state(classes)
            if not observe:
                state = state[:2] + (None,)  # Policy.step passes no counter when it does not observe
            args = (fixed_direction, fixed_eps)

            def run(fn, values, *extra):
                values, trend = values.clone(), [None if t is None else t.clone() for t in state]
                result = fn(values, *args, *trend, PARAMS, direction, radius, observe, clear, dtype, *extra)
                return result, values, trend

            (want, want_stats, want_trend), (got, got_stats, got_trend) = run(naive.policy_, stats), run(
                op.policy_, stats, "reference")
            assert got[0].dtype == got[1].dtype == dtype, what
            assert_same(got[0], want[0], f"{what}: direction")
            truth = naive.policy_(stats.double(), fixed_direction.double(), fixed_eps.double(),
                                  *[None if t is None else t.clone() for t in state], PARAMS, direction, radius,
                                  observe, False, torch.float64)
            assert_close_to_reference(got[1], truth[1], want[1], f"{what}: eps")
            for name, w, g in zip(("loss_ema", "fall_ema", "skipped"), want_trend, got_trend):
                if w is not None:
                    assert_same(g, w, f"{what}: {name}")
            assert_same(got_stats, want_stats, f"{what}: statistics")
            if direction == "fixed":
                assert got[0] is fixed_direction, what
            if radius == "fixed":
                assert got[1] is fixed_eps, what


def test_policy_cases_are_not_vacuous():
    """The "mixed" statistics have classes on both sides of thr, absent and rejected classes; the
    "equal" ones make every confidence gap 0 (the radii are eps, or min_radius for the linear one)."""
    torch.manual_seed(33)  # as in the test above
    stats = policy_stats(33, torch.float64, "mixed")
    present, finite, _, _ = naive.class_means(stats)
    assert (~present & finite).any() and (~finite).sum() == 2 and present.sum() > 2
    direction, _ = naive.policy_(stats.clone(), None, None, *trend_state(33)[:2], None, PARAMS, "confidence",
                                 "fixed", False, False, torch.float64)
    assert set(direction.tolist()) == {-1.0, 0.0, 1.0}
    direction, radii = naive.policy_(policy_stats(7, torch.float64, "equal"), None, None, None, None, None, PARAMS,
                                     "confidence", "confidence_linear", False, False, torch.float64)
    assert not direction.any() and radii.eq(PARAMS[2]).all()


def test_the_kernels_leave_unserved_calls_to_pytorch():
    """Statistics of another dtype than their log-probabilities, a policy output dtype other than the
    statistics', a strided fixed tensor: the launchers decline, and ``op`` still matches the definition."""
    stats, log_probs, labels = torch.zeros(3, 5), log_probs_of(4, 5, torch.float64, False), torch.arange(4)
    assert _host_ext.class_stats(stats, log_probs, labels, None, False) is None
    assert op.class_stats_(stats, log_probs, labels, None, False, "reference") is None
    assert_same(stats, naive.class_stats_(torch.zeros(3, 5), log_probs, labels, None, False), "class statistics")
    stats = policy_stats(5, torch.float64, "mixed")
    assert _host_ext.policy(stats.clone(), None, None, None, None, None, PARAMS, "confidence", "confidence", False,
                            False, torch.float32) is None
    strided = torch.ones(5, 2)[:, 0]
    assert _host_ext.policy(stats.clone(), strided.double(), torch.ones(5, 2, dtype=torch.float64)[:, 0], None, None,
                            None, PARAMS, "fixed", "fixed", False, False, torch.float64) is None
    got = op.policy_(stats.clone(), None, None, None, None, None, PARAMS, "confidence", "confidence", False, False,
                     torch.float32, "reference")
    want = naive.policy_(stats.clone(), None, None, None, None, None, PARAMS, "confidence", "confidence", False, False,
                         torch.float32)
    assert_same(got[0], want[0], "direction")
    assert_same(got[1], want[1], "eps")


def test_the_policy_bumps_the_versions_of_what_it_writes():
    """Writes through pointers are announced as in-place ops would be (autograd's saved-tensor check)."""
    stats, (loss_ema, fall_ema, skipped) = policy_stats(7, torch.float32, "mixed"), trend_state(7)
    before = [t._version for t in (stats, loss_ema, fall_ema, skipped)]
    assert _host_ext.policy(stats, None, None, loss_ema, fall_ema, skipped, PARAMS, "loss_trend", "confidence", True,
                            True, torch.float32) is not None
    assert all(t._version > v for t, v in zip((stats, loss_ema, fall_ema, skipped), before))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("verdict", [True, False], ids=["ok", "rejected"])
@pytest.mark.parametrize("radius", list(naive.RADII))
@pytest.mark.parametrize("direction", list(naive.DIRECTIONS))
def test_policy_then_pgd_step_in_one_call(reference_path, direction, radius, verdict, norm, dtype):
    """``op.policy_pgd_step_`` (the single-pass update; one host call) equals ``naive.policy_`` followed by
    ``pgd.naive.guarded_pgd_step_`` with its direction and radii: delta, the statistics (cleared), the
    trend state and both counters, with non-finite gradient rows and a rejected batch."""
    from lpa_kernels.pgd import naive as pgd_naive
    from tests.host.test_host_pgd_step import gradient_rows, start_delta

    classes, features = 10, 13  # one class per row of gradient_rows
    torch.manual_seed(classes)
    stats = policy_stats(classes, dtype, "mixed")
    fixed = (torch.randint(-1, 2, (classes,)).to(dtype), (torch.rand(classes) + 0.5).to(dtype))
    step = torch.linspace(0.05, 0.9, classes).to(dtype)
    delta, grad = start_delta(classes, features, dtype), gradient_rows(features, dtype)
    ok, trend = torch.tensor(verdict), trend_state(classes)

    def run(update):
        state = [t.clone() for t in (stats, delta, *trend, torch.tensor(5))]
        versions = [t._version for t in state]
        update(*state)
        # what is written through pointers is announced as an in-place op would announce it
        assert all(t._version > v for t, v in zip(state, versions)), f"{update.__name__}: a version was not bumped"
        return state

    def two_ops(stats, delta, loss_ema, fall_ema, stat_skipped, skipped):
        chosen, radii = naive.policy_(stats, *fixed, loss_ema, fall_ema, stat_skipped, PARAMS, direction, radius,
                                      True, True, dtype)
        pgd_naive.guarded_pgd_step_(delta, grad, step, radii, chosen, norm, ok, skipped)

    def one_call(stats, delta, loss_ema, fall_ema, stat_skipped, skipped):
        op.policy_pgd_step_(stats, *fixed, loss_ema, fall_ema, stat_skipped, PARAMS, direction, radius, True, True,
                            delta, grad, step, norm, ok, skipped, "reference")

    want, got = run(two_ops), run(one_call)
    for name, w, g in zip(("statistics", "delta", "loss_ema", "fall_ema", "statistics skipped", "skipped"), want, got):
        exact = {} if name == "delta" else dict(rtol=0, atol=0)  # the l2 norm's sum order differs (pgd_step's tests)
        torch.testing.assert_close(g, w, equal_nan=True, msg=f"{direction}/{radius} {norm}: {name}", **exact)
    assert got[0].eq(0).all()  # cleared
    assert verdict is False or int(got[5]) > 5  # the non-finite rows were counted
    assert not torch.equal(got[1], delta) or verdict is False  # the step moved delta
    if reference_path.name == "host":
        assert reference_path.calls == ["policy_pgd_step"]


def test_policy_then_pgd_step_leaves_unserved_calls_to_the_two_ops():
    """A gradient of another dtype than delta: the host call declines and the two ops run (same result)."""
    from lpa_kernels.pgd import naive as pgd_naive

    stats, delta, grad = policy_stats(5, torch.float32, "mixed"), torch.zeros(5, 3), torch.randn(5, 3).double()
    ok, skipped, step = torch.tensor(True), torch.tensor(0), torch.full((5,), 0.1)
    assert _host_ext.policy_pgd_step(stats.clone(), None, None, None, None, None, PARAMS, "confidence",
                                     "confidence", False, True, delta, grad, step, "linf", ok, skipped) is None
    assert delta.eq(0).all()
    want_delta, got_stats = delta.clone(), stats.clone()
    chosen, radii = naive.policy_(stats.clone(), None, None, None, None, None, PARAMS, "confidence", "confidence", False,
                                  True, torch.float32)
    pgd_naive.guarded_pgd_step_(want_delta, grad.float(), step, radii, chosen, "linf", ok, skipped.clone())
    op.policy_pgd_step_(got_stats, None, None, None, None, None, PARAMS, "confidence", "confidence", False, True,
                        delta, grad.float(), step, "linf", ok, skipped, "reference")
    assert_same(delta, want_delta, "delta")
    assert got_stats.eq(0).all()
