"""``lpa_bench.timing``'s CPU timer: the paired medians that the training-step ratios use."""

from __future__ import annotations

import time

import torch

from lpa_bench.timing import paired_median_ms


def test_paired_medians_alternate_the_two_calls():
    calls = []
    paired_median_ms(lambda: calls.append("a"), lambda: calls.append("b"), torch.device("cpu"), quick=True)
    assert len(calls) >= 2 * 4 and calls == ["a", "b"] * (len(calls) // 2)


def test_a_drift_during_the_run_weighs_on_both_alike():
    """Equal work that slows down steadily over the run: paired medians stay equal (sequential ones would not)."""
    rounds = []

    def work():  # each call of either function sleeps a little longer than the round before
        time.sleep(2e-4 * (1 + len(rounds) // 2))
        rounds.append(None)

    fn_ms, reference_ms = paired_median_ms(work, work, torch.device("cpu"), quick=True)
    assert abs(fn_ms / reference_ms - 1) < 0.1
