"""``lpa-train`` under torchrun (2 gloo processes on the CPU), its checkpoints and resuming them.

One module fixture trains the same LPA run (T = 3 autograd PGD, 4 epochs, checkpoints every epoch) five
ways: one process from scratch (A), two DDP processes from scratch (B), one process resumed from B's
epoch-2 checkpoint (C: 2 -> 1 processes), two FSDP2 processes resumed from A's epoch-2 checkpoint (D:
1 -> 2 processes, the "host" collective-order guard where B has the default "device" one), one process
resumed from D's epoch-3 checkpoint (E: FSDP2 -> plain). A checkpoint
left after epoch 2 is exactly what a run stopped there leaves.

Tolerance: the ranks sum gradients in another order than one process does, so float32 results differ
by rounding: weights and delta agree to ``TOLERANCE`` (largest difference measured on 2026-11-30:
1.5e-7 after 2 epochs, 7e-7 after 4). On one process a resumed run is bitwise the uninterrupted one."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lpa_programs.train import main

EPOCHS = 4
TOLERANCE = 1e-5
RUN = ["--dataset", "synthetic-lt", "--seeds", "0", "--epochs", str(EPOCHS), "--width", "16", "--head", "never",
       "--quiet", "--save-every", "1", "--keep-last", "4"]
TORCHRUN_TIMEOUT_S = 240


def torchrun(*args: str, timeout: float = TORCHRUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # from the repository root, where ``-m tests.programs.faulty_rank`` is found
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parents[2])


def checkpoint(folder, epoch: int, method: str = "lpa") -> dict:
    return torch.load(folder / f"{method}-seed0" / f"epoch-{epoch:04d}.pt", weights_only=True)


def assert_same_training(got: dict, expected: dict, tolerance: float) -> None:
    for part in ("model", "method"):
        assert sorted(got[part]) == sorted(expected[part])
        for key, value in expected[part].items():
            torch.testing.assert_close(got[part][key], value, rtol=0, atol=tolerance, msg=f"{part} {key}")
    assert got["epoch"] == expected["epoch"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["--method", "lpa", *RUN, "--save-dir", str(root / "A")]) == 0
    done = torchrun("-m", "lpa_programs.train", "--method", "lpa", "mixup", *RUN, "--save-dir", str(root / "B"),
                    "--json", str(root / "B.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = root / "B-stopped" / "lpa-seed0"  # --resume DIR: the newest checkpoint of each run in DIR
    stopped.mkdir(parents=True)
    shutil.copy(root / "B" / "lpa-seed0" / "epoch-0002.pt", stopped)
    assert main(["--method", "lpa", *RUN, "--save-dir", str(root / "C"), "--resume", str(stopped.parent)]) == 0
    done = torchrun("-m", "lpa_programs.train", "--method", "lpa", *RUN, "--fsdp", "--save-dir", str(root / "D"),
                    "--resume", str(root / "A" / "lpa-seed0" / "epoch-0002.pt"), "--order-guard", "host")
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["--method", "lpa", *RUN, "--save-dir", str(root / "E"),
                 "--resume", str(root / "D" / "lpa-seed0" / "epoch-0003.pt")]) == 0
    return root


def test_two_processes_train_like_one_on_the_same_global_batches(runs):
    for epoch in (2, EPOCHS):
        assert_same_training(checkpoint(runs / "B", epoch), checkpoint(runs / "A", epoch), TOLERANCE)
    report = json.loads((runs / "B.json").read_text())
    assert report["finished"] and report["processes"] == 2 and [r["method"] for r in report["runs"]] == ["lpa", "mixup"]
    saved = checkpoint(runs / "B", EPOCHS)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2, "every rank's RNG state"
    assert {"model", "method", "optimizer", "scheduler", "sampler", "args", "config", "lpa_config", "progress"} <= set(saved)
    assert saved["sampler"] == {"seed": 0, "epoch": EPOCHS} and len(saved["progress"]["step_seconds"]) == saved["method"][
        "counters.training_steps"], "the step times of every epoch"


def test_a_checkpoint_of_two_processes_resumes_on_one_and_of_one_on_two_with_fsdp_and_back(runs):
    assert_same_training(checkpoint(runs / "C", EPOCHS), checkpoint(runs / "A", EPOCHS), TOLERANCE)
    assert_same_training(checkpoint(runs / "D", EPOCHS), checkpoint(runs / "A", EPOCHS), TOLERANCE)
    assert_same_training(checkpoint(runs / "E", EPOCHS), checkpoint(runs / "A", EPOCHS), TOLERANCE)
    assert not (runs / "C" / "lpa-seed0" / "epoch-0002.pt").exists(), "a resumed run rewrote an epoch it did not train"


def test_resumed_after_epoch_2_equals_the_uninterrupted_run_bitwise_on_one_process(runs, tmp_path):
    assert main(["--method", "lpa", *RUN, "--save-dir", str(tmp_path), "--keep-last", "1",
                 "--resume", str(runs / "A" / "lpa-seed0" / "epoch-0002.pt")]) == 0
    assert sorted(p.name for p in (tmp_path / "lpa-seed0").iterdir()) == [f"epoch-{EPOCHS:04d}.pt"], \
        "--keep-last 1 kept more, or a temporary file was left"
    resumed, uninterrupted = checkpoint(tmp_path, EPOCHS), checkpoint(runs / "A", EPOCHS)
    assert_same_training(resumed, uninterrupted, tolerance=0)
    for key in ("optimizer", "scheduler"):
        assert str(resumed[key]) == str(uninterrupted[key]), key


def test_a_rank_that_raises_ends_every_rank_with_the_error(tmp_path):
    start = time.monotonic()
    # rank 1's 10th training call (the 1st is lpa-train's check step) gets a label out of range
    done = torchrun("-m", "tests.programs.faulty_rank", "1", "10", "--method", "lpa", *RUN[:-4],
                    timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode != 0
    assert time.monotonic() - start < TORCHRUN_TIMEOUT_S
    assert "labels must lie in [0, 10)" in done.stderr


@pytest.mark.parametrize("options, message", [
    (["--save-every", "1"], "argument --save-every: needs --save-dir"),
    (["--save-dir", "{tmp}/out"], "argument --save-dir: needs --save-every N"),
    (["--resume", "{tmp}/nowhere"], "argument --resume: no such file or folder"),
    (["--resume", "{tmp}/junk.pt"], "junk.pt is not a file torch.save wrote"),
    (["--resume", "{A}/lpa-seed0/epoch-0002.pt", "--lr", "0.1"],
     "was written with --lr 0.05, this command has 0.1 (the options that shape training must match)"),
    (["--resume", "{A}/lpa-seed0/epoch-0002.pt", "--method", "erm"], "belongs to run {'method': 'lpa', 'seed': 0}"),
    (["--resume", "{A}/lpa-seed0/epoch-0002.pt", "--imbalance", "20"],
     "was written with --imbalance 10.0, this command has 20.0"),
    # the option given, not the step sizes resolved from it (which sort before it)
    (["--resume", "{A}/lpa-seed0/epoch-0002.pt", "--radius", "confidence"],
     "was written with --radius constant, this command has confidence"),
    (["--fsdp"], "argument --fsdp: needs several processes"),
])
def test_checkpoint_and_distributed_mistakes_exit_2_with_one_line(runs, tmp_path, capsys, options, message):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    options = [o.format(tmp=tmp_path, A=runs / "A") for o in options]
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "lpa", *RUN[:-4], *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error


def test_resume_takes_options_given_as_their_defaults(runs, tmp_path):
    """The synthetic-lt default imbalance (10) and the step size lpa-train resolves, given explicitly: the
    same training, so --resume accepts them (they were refused as 'None vs 10.0')."""
    from lpa_kernels.lpa import LPAConfig
    from lpa_programs.data import DEFAULT_IMBALANCE

    saved = torch.load(runs / "A" / "lpa-seed0" / "epoch-0002.pt", weights_only=True)
    step = LPAConfig(**saved["lpa_config"]).resolved_step_size
    assert main(["--method", "lpa", *RUN, "--save-dir", str(tmp_path), "--imbalance",
                 str(DEFAULT_IMBALANCE["synthetic"]), "--step-size", repr(step),
                 "--resume", str(runs / "A" / "lpa-seed0" / "epoch-0002.pt")]) == 0


@pytest.mark.parametrize("method, options, refused", [
    ("lpa", ["--lpl-eps", "3", "--dropout-p", "0.3", "--gamma", "2"], None),  # LPL's, dropout's, a radius rule's
    ("lpa", ["--radius", "frequency", "--gamma", "2"], "--gamma 1.0"),  # read under this command's radius rule
    ("mixup", ["--steps", "0", "--eps", "3", "--direction", "ascent"], None),  # no LPA option is mixup's
    ("mixup", ["--mixup-alpha", "0.7"], "--mixup-alpha"),
])
def test_resume_compares_only_the_options_the_runs_method_reads(runs, method, options, refused):
    """A run's checkpoint resumes whatever the options its method never reads say (they were refused before:
    an lpa run's --lpl-eps changes nothing of its training); an option the method reads still must match."""
    from lpa_programs import checkpoint as checkpoint_options
    from lpa_programs.train import build_parser

    folder = runs / "B" / f"{method}-seed0"
    args = build_parser().parse_args(["--method", method, *RUN[:-4], *options, "--resume", str(folder / "epoch-0002.pt")])
    problem = checkpoint_options.check_arguments(args)
    assert (refused in problem) if refused else problem == "", problem


@pytest.mark.parametrize("option, mode", [("device", "device"), ("host", "host"), ("off", None)])
def test_order_guard_option_sets_the_guard_of_a_launched_process(monkeypatch, option, mode):
    from lpa_kernels.lpa import collectives
    from lpa_programs import distributed

    monkeypatch.setattr(distributed, "launched_world", lambda: 2)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # joined already: setup joins nothing
    try:
        assert distributed.setup(torch.device("cpu"), 10.0, option) == torch.device("cpu")
        assert collectives._guard["mode"] == mode
    finally:
        collectives.set_order_guard(True)


def test_under_torchrun_each_rank_prints_its_error_line_naming_itself(monkeypatch, capsys):
    """Every rank exits 2 with one line; the ranks other than 0 say which they are (an error one rank alone
    finds, e.g. its data folder, must not exit silently)."""
    for rank, prefix in (("1", "lpa-train (rank 1): error: "), ("0", "lpa-train: error: ")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            main(["--epochs", "0"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(prefix) and err.count("\n") == 1, (rank, err)


def test_a_batch_beyond_an_odd_training_set_cannot_be_shared_by_two_processes():
    """With --batch-size above the set's 503 samples one process took all 503 per step, two took 2 x 251:
    another global batch. Refused (a batch of 502 is the same on 1 and 2 processes)."""
    from lpa_programs.distributed import Batches, Context, batch_split_problem

    problem = batch_split_problem(1000, 503, 2)
    assert "more than the 503 training samples" in problem and "--batch-size 502 or less" in problem, problem
    with pytest.raises(ValueError, match="cannot share evenly"):
        Batches(503, 1000, 0, Context(0, 2))
    assert batch_split_problem(1000, 503, 1) == batch_split_problem(1000, 502, 2) == batch_split_problem(502, 503, 2) == ""
    one = next(Batches(503, 502, 0, Context(0, 1)).epoch(0, torch.device("cpu")))
    two = [next(Batches(503, 502, 0, Context(rank, 2)).epoch(0, torch.device("cpu"))) for rank in (0, 1)]
    assert sorted(torch.cat(two).tolist()) == sorted(one.tolist()) and len(one) == 502
