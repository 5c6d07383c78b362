"""``lpa-train --save-dir`` / ``--resume`` in one process: which folders and options are taken or refused, the
order of checkpoints past epoch 9999, and a SIGTERM while a checkpoint is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lpa_programs import checkpoint
from lpa_programs.train import build_parser, main

TINY = ["--epochs", "1", "--batch-size", "64", "--quiet", "--width", "16", "--seeds", "0", "--save-every", "1"]
SPLIT = ["--direction", "split", "--steps", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """``plain/{erm,lpa}-seed0`` (LPAConfig's defaults) and ``split/{lpa,la+lpa}-seed0`` (single-pass LPA with
    the split direction): one epoch each, a checkpoint after it."""
    root = tmp_path_factory.mktemp("saved")
    assert main(["--method", "erm", "lpa", *TINY, "--save-dir", str(root / "plain")]) == 0
    assert main(["--method", "lpa", "la+lpa", *TINY, *SPLIT, "--save-dir", str(root / "split")]) == 0
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str]) -> str:
    """The one error line ``main(argv)`` exits 2 with."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lpa-train: error: "), err
    return err


def test_a_fresh_run_into_a_save_dir_holding_its_runs_checkpoints_is_refused_and_changes_nothing(saved, tmp_path,
                                                                                                 capsys):
    """Another run's checkpoints in the run's folder would be overwritten (and --keep-last would then delete
    the new run's own): refused before training, naming the folder and the ways out."""
    shutil.copytree(saved / "plain", tmp_path / "ckpt")
    before = _files(tmp_path / "ckpt")
    err = _refused(capsys, ["--method", "lpa", *TINY, "--lr", "0.01", "--save-dir", str(tmp_path / "ckpt")])
    assert f"argument --save-dir: {tmp_path / 'ckpt' / 'lpa-seed0'} holds checkpoints of an earlier run" in err, err
    assert "--resume" in err and "another --save-dir" in err, err
    assert _files(tmp_path / "ckpt") == before, "a refused command changed the save dir"


def test_a_save_dir_is_taken_when_the_run_continues_its_checkpoints_there(saved, tmp_path):
    """--resume DIR --save-dir DIR (continue where it stopped) and a run whose folder is still empty are fine."""
    shutil.copytree(saved / "plain", tmp_path / "ckpt")
    args = build_parser().parse_args(["--method", "erm", "lpa", "mixup", *TINY, "--save-dir", str(tmp_path / "ckpt"),
                                      "--resume", str(tmp_path / "ckpt")])
    assert checkpoint.check_arguments(args) == ""


def test_resume_dir_without_a_checkpoint_of_any_run_is_refused_naming_what_it_looked_for(saved, tmp_path, capsys):
    """The run's own folder given to --resume (instead of the folder above it) found nothing and the run
    started again from epoch 0; now it is refused. A folder with checkpoints for some runs only still
    resumes those (the docs: a run without one starts from scratch)."""
    shutil.copytree(saved / "plain", tmp_path / "ckpt")
    run_folder = tmp_path / "ckpt" / "lpa-seed0"
    before = _files(tmp_path / "ckpt")
    err = _refused(capsys, ["--method", "lpa", *TINY, "--save-dir", str(tmp_path / "out"), "--resume", str(run_folder)])
    assert f"no checkpoint of this command's runs in {run_folder}" in err, err
    assert str(run_folder / "lpa-seed0" / "epoch-NNNN.pt") in err and "give the folder above it" in err, err
    assert _files(tmp_path / "ckpt") == before and not (tmp_path / "out").exists()
    some = build_parser().parse_args(["--method", "lpa", "mixup", *TINY, "--save-dir", str(tmp_path / "out"),
                                      "--resume", str(tmp_path / "ckpt")])
    assert checkpoint.check_arguments(some) == ""


def test_resume_dir_takes_the_highest_epoch_not_the_last_name(tmp_path):
    folder = tmp_path / "lpa-seed0"
    folder.mkdir()
    for name in ("epoch-9999.pt", "epoch-10000.pt", "epoch-0002.pt"):
        (folder / name).touch()
    assert checkpoint.resume_file(str(tmp_path), "lpa", 0) == folder / "epoch-10000.pt"


def test_keep_last_past_epoch_9999_keeps_the_newest(saved, tmp_path):
    """A run resumed after epoch 9999 saves epoch-10000.pt; --keep-last 1 must delete epoch-9999.pt, not
    the new checkpoint (as strings, epoch-10000.pt sorts first)."""
    state = torch.load(saved / "plain" / "lpa-seed0" / "epoch-0001.pt", weights_only=True)
    state["epoch"], state["config"]["epochs"] = 9999, 10000
    (tmp_path / "lpa-seed0").mkdir()
    torch.save(state, tmp_path / "lpa-seed0" / "epoch-9999.pt")
    assert main(["--method", "lpa", *TINY, "--epochs", "10000", "--save-every", "5000", "--keep-last", "1",
                 "--save-dir", str(tmp_path), "--resume", str(tmp_path)]) == 0
    assert [p.name for p in (tmp_path / "lpa-seed0").iterdir()] == ["epoch-10000.pt"]
    assert torch.load(tmp_path / "lpa-seed0" / "epoch-10000.pt", weights_only=True)["epoch"] == 10000


@pytest.mark.parametrize("folder, method, options", [
    ("plain", "lpa", ["--init", "fresh"]),  # the init T = 3 resolves to
    ("split", "lpa", [*SPLIT, "--init", "carried"]),  # the init single pass resolves to
    ("split", "lpa", [*SPLIT, "--head-classes", "4"]),  # LPL's head of 10 classes
    ("split", "lpa", [*SPLIT, "--head-fraction", "0.4"]),  # the same head as a fraction
    ("split", "la+lpa", [*SPLIT, "--loss", "la"]),  # the loss the la methods force
    ("plain", "erm", ["--layer", "features.1"]),  # erm perturbs nothing at its layer
])
def test_resume_takes_options_given_as_the_value_they_resolve_to(saved, tmp_path, folder, method, options):
    """The docs compare options as resolved: each of these trains exactly as the option left out did."""
    args = build_parser().parse_args(["--method", method, *TINY, *options, "--save-dir", str(tmp_path),
                                      "--resume", str(saved / folder / f"{method}-seed0" / "epoch-0001.pt")])
    assert checkpoint.check_arguments(args) == ""


@pytest.mark.parametrize("folder, method, options, refused", [
    ("split", "lpa", [*SPLIT, "--head-classes", "3"], "--head-classes 4, this command has 3"),
    ("plain", "lpa", ["--layer", "features.1"], "--layer"),
    ("split", "la+lpa", [*SPLIT, "--tau", "2"], "--tau 1.0, this command has 2.0"),
])
def test_resume_still_refuses_options_that_change_training(saved, tmp_path, folder, method, options, refused):
    args = build_parser().parse_args(["--method", method, *TINY, *options, "--save-dir", str(tmp_path),
                                      "--resume", str(saved / folder / f"{method}-seed0" / "epoch-0001.pt")])
    problem = checkpoint.check_arguments(args)
    assert refused in problem, problem


_TERMINATED_WHILE_SAVING = """
import os, signal, sys, torch
save = torch.save
def save_then_sigterm(*args, **kwargs):  # the checkpoint's temporary file is written, not yet renamed
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
torch.save = save_then_sigterm
from lpa_programs.train import run_as_program
run_as_program(sys.argv[1:])
"""


def test_sigterm_while_a_checkpoint_is_written_stops_cleanly(tmp_path):
    """SIGTERM (what schedulers send) stops a run as Ctrl-C does: the checkpoint's temporary file is removed
    (it was left forever), the JSON stays unfinished, one line and status 128 + 15."""
    done = subprocess.run([sys.executable, "-c", _TERMINATED_WHILE_SAVING, "--method", "lpa", *TINY,
                           "--save-dir", str(tmp_path / "ckpt"), "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith("lpa-train: stopped by signal SIGTERM"), done.stderr[-2000:]
    assert list((tmp_path / "ckpt" / "lpa-seed0").iterdir()) == [], "a temporary checkpoint file was left"
    assert json.loads((tmp_path / "out.json").read_text())["finished"] is False
