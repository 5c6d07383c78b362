"""lpa-train end to end: short runs through ``main``, the JSON it writes, and the console script."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from lpa_kernels.lpa import DIRECTIONS, METHODS, RADII, LPAConfig
from lpa_programs.data import long_tail_counts
from lpa_programs.train import FIGURES, build_parser, main, make_config
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
    assert make_config(args) == LPAConfig(), "LPAConfig's defaults apply"


def _console_script() -> str:
    bin_dirs = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("lpa-train", path=bin_dirs)
    assert script, "the lpa-train console script is installed (pip install -e .)"
    return script


def test_console_script_help_shows_each_real_default_once():
    done = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--method", "--dataset", "--data-dir", "--imbalance", "--steps", "--direction", "--json"):
        assert option in done.stdout, f"--help documents {option}"
    text = " ".join(done.stdout.split())  # help lines wrap anywhere
    assert "(default: None)" not in text
    defaults = LPAConfig()
    for option, value in (("eps", defaults.eps), ("steps", defaults.steps), ("direction", defaults.direction),
                          ("step-size", "2.5 x the largest radius / steps"), ("lpl-steps", defaults.lpl_steps)):
        entry = text.split(f"--{option} ", 2)[2].split(" --")[0]  # usage line, then the option's help
        assert entry.count("(default:") == 1 and f"(default: {value}" in entry, f"--{option}: {entry}"
    for name in list(METHODS) + list(DIRECTIONS) + list(RADII):  # choices and help from the registries
        assert f"{name}:" in text, f"--help explains {name}"
    for option in ("--dataset", "--epochs", "--batch-size"):
        assert "(default:" in text.split(f"{option} ", 2)[2].split(" --")[0], f"{option} shows its default"


def test_console_script_user_error_is_one_line_and_exit_status_2():
    done = subprocess.run([_console_script(), "--epochs", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["lpa-train: error: argument --epochs: must be >= 1, got 0 "
                                        "(see lpa-train --help)"]


def _no_training(*_args, **_kw):
    raise AssertionError("training started before every option was checked")


USER_ERRORS = {
    "epochs-0": (["--epochs", "0"], "argument --epochs: must be >= 1"),
    "batch-size-0": (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    "negative-lr": (["--lr", "-1"], "argument --lr: must be > 0"),
    "bad-eps": (["--eps", "0"], "eps must be a finite number > 0"),
    "infinite-tau": (["--method", "la", "--tau", "inf"], "tau must be a finite number >= 0"),
    "single-pass-fresh": (["--steps", "0", "--init", "fresh"], "steps=0 (single-pass mode) needs init='carried'"),
    "bad-device": (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    "missing-data-dir": (["--dataset", "cifar10-lt"], "needs --data-dir"),
    "absent-data-dir": (["--dataset", "cifar10-lt", "--data-dir", "/no/such/folder"],
                        "argument --data-dir: no such folder: /no/such/folder"),
    "imbalance-not-lt": (["--dataset", "digits", "--imbalance", "5"], "applies to the -lt datasets only"),
    "unknown-layer": (["--layer", "nope"], "layer='nope' is not a submodule"),
    "unknown-compile-mode": (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    "absurd-threads": (["--threads", "100000"], "argument --threads: must be >= 1 and <= "),
    "infinite-lr": (["--lr", "inf"], "argument --lr: must be > 0"),
    "model-beyond-memory": (["--width", "10000000000"], "the model does not fit in the cpu memory"),
    "head-always-off-head": (["--method", "lpa", "--layer", "features.1", "--head", "always"],
                             "--method lpa cannot train with these settings: head='always' needs"),
    # torch.manual_seed takes seeds below 2^64, and the batch order is seeded with seed + epoch
    "seed-beyond-2^64": (["--seed", "18446744073709551616"],
                         "argument --seed/--seeds: must be >= 0 and <= 9223372036854775807, got 18446744073709551616"),
    "seed-plus-epoch-beyond-2^64": (["--seed", "18446744073709551615", "--epochs", "2"], "argument --seed/--seeds"),
    "threads-beyond-a-float": (["--threads", "1" + "0" * 400], "argument --threads: must be >= 1 and <= "),
    # the optimizer's step takes them as float32
    "lr-beyond-float32": (["--lr", "1e39"], "argument --lr: must be > 0 and <= 3.40282e+38, got 1e39"),
    "weight-decay-beyond-float32": (["--weight-decay", "1e39"], "argument --weight-decay: must be >= 0 and <= 3.4"),
    # torch's message spans two lines
    "mixup-alpha-zero-in-float32": (["--method", "mixup", "--mixup-alpha", "1e-300"],
                                    "--method mixup cannot train with these settings: mixup_alpha=1e-300 rounds to 0"),
    "dist-timeout-beyond-timedelta": (["--dist-timeout", "1e30"], "argument --dist-timeout: must be >= 1 and <= 1e+09"),
    # an empty name was no report at all (--json) or "." named as a folder (--plot)
    "json-empty": (["--json", ""], "argument --json: the file name is empty"),
    "plot-empty": (["--plot", ""], "argument --plot: the file name is empty"),
}


@pytest.mark.parametrize("argv, message", USER_ERRORS.values(), ids=USER_ERRORS.keys())
def test_user_errors_exit_2_with_one_line_before_any_training(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("lpa-train: error: ") and message in err, err


def test_empty_cifar_folder_is_a_user_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit, match="2"):
        main([*TINY, "--dataset", "cifar10-lt", "--data-dir", str(tmp_path)])
    assert "CIFAR-10 files" in capsys.readouterr().err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _other_cifars_keys(path: Path) -> None:  # a CIFAR-100 file in a CIFAR-10 folder
    path.write_bytes(pickle.dumps({b"data": [], b"fine_labels": []}))


@pytest.mark.parametrize("damage, name, message", [
    (_truncate, "test_batch", "UnpicklingError"),
    (lambda path: path.write_bytes(b""), "data_batch_2", "EOFError"),
    (_other_cifars_keys, "test_batch", "does not hold the keys"),
], ids=["truncated", "empty", "other-cifars-keys"])
def test_a_damaged_cifar_file_is_one_line_naming_it(monkeypatch, capsys, tmp_path, damage, name, message):
    """A truncated download, an empty file or the other CIFAR's file gave a traceback."""
    folder = write_cifar(tmp_path, 10, per_class_per_file=1)
    damage(folder / name)
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"the CIFAR file {folder / name}" in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "argument --device: cuda asked for, but torch sees no CUDA GPU"),
    (["--backend", "cuda"], "argument --backend: backend='cuda' is not available"),
    (["--backend", "triton"], "argument --backend: backend='triton' is not available for a cpu tensor: "
                              "CPU tensors need TRITON_INTERPRET=1"),
], ids=["device-cuda", "backend-cuda", "backend-triton-without-interpreter"])
def test_unavailable_device_or_backend_is_refused_before_training(monkeypatch, capsys, argv, message):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit, match="2"):
        main([*TINY, *argv])
    assert message in capsys.readouterr().err


def test_json_that_is_a_folder_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit, match="2"):
        main([*TINY, "--json", str(tmp_path)])
    assert "argument --json" in capsys.readouterr().err


def test_json_is_written_after_every_run_so_a_late_failure_loses_nothing(monkeypatch, tmp_path):
    import lpa_programs.train as train

    finished_runs = []

    def fail_on_the_second_run(*args, **kw):
        if finished_runs:
            raise RuntimeError("late failure")
        finished_runs.append(real(*args, **kw))
        return finished_runs[-1]

    real = train.train_one
    monkeypatch.setattr(train, "train_one", fail_on_the_second_run)
    out = tmp_path / "partial.json"
    old_umask = os.umask(0o022)
    try:
        with pytest.raises(RuntimeError, match="late failure"):
            main([*TINY, "--method", "erm", "lpa", "--seeds", "0", "--json", str(out)])
    finally:
        os.umask(old_umask)
    report = json.loads(out.read_text())
    assert report["finished"] is False and [r["method"] for r in report["runs"]] == ["erm"]
    assert report["summary"]["erm"]["overall"]["n"] == 1
    assert out.stat().st_mode & 0o777 == 0o644, "result files get the usual permissions, not 0600"
    assert [p.name for p in tmp_path.iterdir()] == ["partial.json"], "no temporary file is left behind"


def test_banner_prints_every_setting_in_force_and_table_names_the_pgd_path(tmp_path, capsys):
    report = _run(tmp_path, "--method", "lpa", "lpa+lpl", "--seeds", "0", "--eps", "0.5")
    out = capsys.readouterr().out
    config = LPAConfig(eps=0.5)
    for name, value in config.settings_for("lpa+lpl").items():
        if name != "backend":
            assert f"{name}={value}" in out, f"the banner shows {name}"
    assert "backend=auto (reference here)" in out
    assert report["finished"] is True and report["summary"]["lpa"]["pgd_path"] == "fused head"
    assert report["summary"]["lpa+lpl"]["pgd_path"] == "fused head + logits"
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert "PGD steps/step" in header and "skipped updates" in header and "PGD path" in header
    lpa_row = next(line for line in out.splitlines() if line.startswith("lpa "))
    assert lpa_row.split()[-6:] == ["1.00", "1.00", "3.00", "0", "fused", "head"], lpa_row


def test_pgd_path_on_the_autograd_path_and_in_single_pass(tmp_path):
    autograd = _run(tmp_path, "--method", "lpa", "--seeds", "0", "--head", "never")["runs"][0]
    assert autograd["pgd_path"] == "autograd" and autograd["stats"]["upper_forwards"] == 4 * autograd["steps"]
    single = _run(tmp_path, "--method", "lpa", "--seeds", "0", "--steps", "0")["runs"][0]
    assert single["pgd_path"] == "single pass"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_runs_each_method_through_its_compiled_training_loss(tmp_path, monkeypatch, mode):
    """``--compile [MODE]`` trains through ``Method.compiled_training_loss`` with torch.compile's mode
    (tested against eager in tests/lpa/test_compile.py); here with dynamo's eager backend, to keep the run
    short (a backend excludes a mode, so the mode is recorded, then dropped)."""
    from lpa_kernels.lpa import Method

    compiled = Method.compiled_training_loss
    calls = []

    def eager_backend(self, **options):
        calls.append((self.name, options.pop("mode", None)))
        return compiled(self, backend="eager", **options)

    monkeypatch.setattr(Method, "compiled_training_loss", eager_backend)
    report = _run(tmp_path, "--method", "erm", "lpa", "--dataset", "synthetic", "--seeds", "0", "--steps", "0",
                  "--compile", *([mode] if mode else []))
    assert calls == [("erm", mode), ("lpa", mode)]
    assert all(run["stats"]["training_steps"] == run["steps"] for run in report["runs"])



@pytest.mark.parametrize("lpa_path", [
    ["--steps", "0"],  # single pass
    ["--steps", "2", "--head", "never"],  # T-step PGD through autograd
    ["--steps", "2"],  # the fused head path
])
def test_amp_runs_the_forward_in_bf16_and_still_learns(tmp_path, monkeypatch, lpa_path):
    """``--amp``: the training forward's GEMMs run in bf16 under autocast (seen by a hook on the model's
    first Linear), the weights stay float32, and two epochs on digits still learn (well above 10%)."""
    seen = set()
    real_linear = torch.nn.Linear.forward

    def recording_linear(self, x):
        out = real_linear(self, x)
        if self.training:
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording_linear)
    report = _run(tmp_path, "--amp", "--method", "lpa", "--dataset", "digits", "--seeds", "0", "--epochs", "2",
                  *lpa_path)
    assert torch.bfloat16 in seen, f"no bf16 GEMM under --amp (dtypes seen: {seen})"
    assert report["args"]["amp"] and report["runs"][0]["overall"] > 50.0


def test_a_save_dir_whose_run_folder_is_a_file_is_refused_before_training(monkeypatch, capsys, tmp_path):
    (tmp_path / "erm-seed0").write_text("in the way")
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--method", "erm", "--seeds", "0", "--save-dir", str(tmp_path), "--save-every", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --save-dir: cannot create the folder" in err, err


def test_a_checkpoint_that_cannot_be_written_mid_run_is_one_line_and_keeps_the_finished_runs(monkeypatch, capsys,
                                                                                              tmp_path):
    def refuse(path, write):
        if "seed1" in str(path):
            raise OSError(28, "No space left on device")
        return write_atomically(path, write)

    from lpa_programs.cli import write_atomically
    monkeypatch.setattr("lpa_programs.checkpoint.write_atomically", refuse)
    report = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--method", "erm", "--seeds", "0", "1", "--save-dir", str(tmp_path / "ck"), "--save-every", "1",
              "--json", str(report)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write a checkpoint" in err and "No space left on device" in err, err
    assert [r["seed"] for r in json.loads(report.read_text())["runs"]] == [0], "the finished run was lost"
