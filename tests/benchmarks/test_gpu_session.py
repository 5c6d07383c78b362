"""``benchmarks/gpu_session.sh`` fits one call of the device tool: its parts run in order within ``TOTAL``
seconds (each cap clamped to the time left, the rest recorded as skipped), and under the tool's ``$OUT``
it leaves two files, rewritten after every part. Run here with ``DRY_RUN`` (every part a ``sleep``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"
PARTS = ["build", "pytest_gpu", "static", "bench", "profile_step", "memcheck", "racecheck"]
DEVICE_CALL_S = 600  # the device tool's limit on one command
FILES_BACK = 8  # the device tool returns at most this many files from $OUT


def _run(script: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60, check=True)


def test_default_caps_fit_one_device_call():
    text = SCRIPT.read_text()
    total = int(re.search(r"^TOTAL=\$\{TOTAL:-(\d+)\}", text, re.M).group(1))
    # at most 15 s past the last limit (SIGKILL after SIGINT), then the packing
    assert total + 15 + 20 <= DEVICE_CALL_S


def test_dry_run_under_out_runs_the_parts_in_order_within_the_total(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _run(SCRIPT, {"OUT": str(out), "DRY_RUN": "1", "TOTAL": "4", "MIN_PART": "1"})
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.tgz", "session.json"]
    assert len(list(out.iterdir())) <= FILES_BACK
    session = json.loads((out / "session.json").read_text())
    assert session["device"] == "dry-run" and session["total_s"] == 4
    steps = session["steps"]
    assert list(steps) == PARTS
    assert steps["build"]["exit_code"] == 0 and steps["build"]["limit_s"] == 4  # clamped from T_BUILD
    ran = [name for name in PARTS if steps[name]["exit_code"] != "skipped"]
    assert ran == PARTS[: len(ran)] and 2 <= len(ran) < len(PARTS), steps
    assert sum(steps[name]["seconds"] for name in ran) <= 4 + 1  # bash's SECONDS: whole seconds
    with tarfile.open(out / "gpu_session.tgz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {f"{name}.log" for name in ran} | {"session.json", "steps.tsv"} <= names


def test_dry_run_without_out_writes_a_dated_folder_under_results(tmp_path):
    script = tmp_path / "benchmarks" / "gpu_session.sh"
    script.parent.mkdir()
    shutil.copy(SCRIPT, script)
    _run(script, {"DRY_RUN": "0", "TOTAL": "30", "MIN_PART": "1"})
    (folder,) = (tmp_path / "benchmarks" / "results" / "dry-run").iterdir()
    session = json.loads((folder / "session.json").read_text())
    assert [session["steps"][name]["exit_code"] for name in PARTS] == [0] * len(PARTS)
    assert session["git_commit"] == "unknown"


def test_the_bench_part_asks_for_sections_lpa_bench_has():
    from lpa_bench.cli import SECTIONS

    ops = re.search(r"^BENCH_OPS=\$\{BENCH_OPS:-([^}]*)\}", SCRIPT.read_text(), re.M).group(1).split()
    assert ops and set(ops) <= set(SECTIONS), ops


def test_bench_budget_follows_its_part_limit_when_clamped(tmp_path):
    """When earlier parts leave the bench part less than its cap, lpa-bench's --budget-s must shrink with the
    limit: a budget past the SIGINT lets the part be cut mid-case instead of stopping cleanly."""
    out = tmp_path / "out"
    out.mkdir()
    run = _run(SCRIPT, {"OUT": str(out), "DRY_RUN": "1", "TOTAL": "45", "MIN_PART": "1"})
    (line,) = [l for l in run.stdout.splitlines() if l.startswith("== bench ")]
    limit = int(re.search(r"limit (\d+)s", line).group(1))
    budget = int(re.search(r"--budget-s (\d+)", line).group(1))
    assert limit < 120 and budget == limit - 30, line  # T_BENCH 120 clamped to the time left; 30 s margin
