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


def test_cpu_copy_is_sized_from_the_last_level_cache(tmp_path, monkeypatch):
    """A 32 MiB copy fits in a 480 MiB L3 and measured the cache, not memory: the copy must be several times
    the largest cache, within the floor and cap."""
    from lpa_bench import timing

    for index, size in enumerate(("48K", "2048K", "491520K")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert timing.last_level_cache_bytes(str(tmp_path / "index*" / "size")) == 480 << 20
    cpu = torch.device("cpu")
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 200 << 20)
    assert timing.copy_bytes(cpu) == 4 * (200 << 20) > timing.copy_bytes(cpu, quick=True)
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 1 << 30)
    assert timing.copy_bytes(cpu) == timing.CPU_COPY_MAX
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: None)
    assert timing.copy_bytes(cpu) == timing.CPU_COPY_MIN
