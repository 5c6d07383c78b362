"""lpa-train end to end: short runs through ``main``, the JSON it writes, and the console script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lpa_kernels.lpa import METHODS
from lpa_programs.data import long_tail_counts
from lpa_programs.train import FIGURES, build_parser, main
from tests.helpers import KERNEL_TARGETS
from tests.programs.fake_cifar import write_cifar

TINY = ["--epochs", "1", "--batch-size", "32", "--quiet", "--width", "16"]


def _run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "out.json"
    assert main([*TINY, *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_erm_and_lpa_over_two_seeds_write_every_documented_figure(tmp_path, capsys):
    report = _run(tmp_path, "--method", "erm", "lpa", "--dataset", "digits-lt", "--seeds", "0", "1")
    assert {"command", "date", "commit", "args", "device", "dataset", "runs", "summary"} <= report.keys()
    assert report["command"].startswith("lpa-train ") and "--method erm lpa" in report["command"]
    ds = report["dataset"]
    assert ds["name"] == "digits-lt" and ds["test_counts"] == [50] * 10 and ds["shot_rule"] == "terciles"
    assert sorted(c for g in ds["groups"].values() for c in g) == list(range(10))
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("erm", 0), ("erm", 1), ("lpa", 0), ("lpa", 1)]
    steps = (sum(ds["train_counts"]) // 32) * 1
    for run in report["runs"]:
        for key in ("overall", "many", "medium", "few"):
            assert 0.0 <= run[key] <= 100.0, f"{run['method']} {key} accuracy {run[key]} is not a percentage"
        assert len(run["per_class"]) == 10 and run["steps"] == steps and run["sec_per_step"] > 0
        assert run["stats"]["training_steps"] == steps, "method.stats() counts every training step"
    lpa_stats = report["runs"][-1]["stats"]
    assert lpa_stats["lower_forwards"] == steps, "LPA runs the lower network once per step"
    assert report["runs"][-1]["config"]["steps"] >= 1, "the default LPA is the multi-step mode"
    for method in ("erm", "lpa"):
        entry = report["summary"][method]
        for fig in FIGURES:
            values = [r[fig] for r in report["runs"] if r["method"] == method]
            assert entry[fig]["n"] == 2 and math.isclose(entry[fig]["mean"], sum(values) / 2)
    table = capsys.readouterr().out
    assert "overall" in table and "few" in table and "\nlpa " in table, "the results table is printed"


def test_single_pass_lpa_at_an_inner_layer_with_lpa_options(tmp_path):
    report = _run(tmp_path, "--method", "lpa", "--dataset", "synthetic-lt", "--seeds", "3", "--steps", "0",
                  "--layer", "features.1", "--mode", "scale", "--norm", "linf", "--eps", "0.2",
                  "--step-size", "0.05", "--direction", "frequency", "--radius", "frequency", "--backend", "reference")
    config = report["runs"][0]["config"]
    assert (config["steps"], config["init"], config["mode"], config["norm"], config["eps"]) == (0, "carried", "scale", "linf", 0.2)
    assert (config["direction"], config["radius"], config["backend"]) == ("frequency", "frequency", "reference")
    stats = report["runs"][0]["stats"]
    assert stats["lower_forwards"] == stats["training_steps"], "single pass: one lower forward per step"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("steps", ["3", "0"], ids=["t-step", "single-pass"])
def test_kernel_backend_trains_like_the_reference_backend(tmp_path, target, steps):
    backend, device = target
    common = ("--method", "lpa+lpl", "--seeds", "0", "--batch-size", "128", "--steps", steps, "--device", device)
    fast = _run(tmp_path, *common, "--backend", backend)["runs"][0]
    reference = _run(tmp_path, *common, "--backend", "reference")["runs"][0]
    assert fast["config"]["backend"] == backend
    # three training steps: the two backends may differ by rounding, which can flip a near-tied test sample
    assert abs(fast["overall"] - reference["overall"]) <= 0.4, f"{backend}: {fast['overall']} vs {reference['overall']}"


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("erm", "lpa")])
def test_every_other_method_trains(tmp_path, method):
    report = _run(tmp_path, "--method", method, "--dataset", "synthetic-lt", "--seeds", "0")
    assert report["runs"][0]["method"] == method and 0 <= report["runs"][0]["overall"] <= 100


def test_resnet_on_a_fake_cifar10_lt_folder(tmp_path):
    write_cifar(tmp_path, 10, per_class_per_file=2)
    report = _run(tmp_path, "--method", "lpa", "--dataset", "cifar10-lt", "--imbalance", "2", "--data-dir",
                  str(tmp_path), "--depth", "1", "--width", "4", "--batch-size", "16", "--seeds", "0")
    assert report["dataset"]["train_counts"] == long_tail_counts(10, 10, 2.0)
    assert report["runs"][0]["steps"] == sum(report["dataset"]["train_counts"]) // 16


def test_no_arguments_means_erm_against_lpa_on_digits_lt_over_three_seeds():
    args = build_parser().parse_args([])
    assert (args.method, args.dataset, args.seeds) == (["erm", "lpa"], "digits-lt", [0, 1, 2])
    assert all(getattr(args, name) is None for name in ("eps", "steps", "direction")), "LPAConfig defaults apply"


def test_console_script_help():
    bin_dirs = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("lpa-train", path=bin_dirs)
    assert script, "the lpa-train console script is installed (pip install -e .)"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--method", "--dataset", "--data-dir", "--imbalance", "--steps", "--direction", "--json"):
        assert option in done.stdout, f"--help documents {option}"
