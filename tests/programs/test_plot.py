"""``lpa-train --plot PATH``: the PNG is written from a real run, the JSON carries the per-epoch curves it
draws, and a missing matplotlib or an unwritable path is a one-line error before any training."""

from __future__ import annotations

import json

import pytest

from lpa_programs.train import main

TINY = ["--epochs", "2", "--batch-size", "64", "--quiet", "--width", "16", "--dataset", "digits-lt"]


def test_plot_writes_a_png_with_per_class_bars_and_per_epoch_curves(tmp_path, capsys):
    png, out = tmp_path / "runs.png", tmp_path / "out.json"
    assert main([*TINY, "--method", "erm", "lpa", "--seeds", "0", "1", "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out
    for run in json.loads(out.read_text())["runs"]:
        assert [point["epoch"] for point in run["epochs"]] == [1, 2], "one point per epoch"
        for point in run["epochs"]:
            assert 0 <= point["test_accuracy"] <= 100 and point["train_loss"] > 0
        # the last epoch's test accuracy is the run's overall accuracy (same model, same test set)
        assert run["epochs"][-1]["test_accuracy"] == pytest.approx(run["overall"])


def _no_training(*_args, **_kw):
    raise AssertionError("training started before --plot was checked")


@pytest.mark.parametrize("missing_matplotlib", [True, False], ids=["no-matplotlib", "unwritable"])
def test_plot_problems_are_one_line_errors_before_training(monkeypatch, capsys, tmp_path, missing_matplotlib):
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    target = tmp_path / "out.png"
    if missing_matplotlib:
        real = __import__("importlib.util").util.find_spec
        monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    else:
        target = tmp_path  # a folder
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--plot", str(target)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert ("needs matplotlib" if missing_matplotlib else "is a folder") in err, err


def test_a_resumed_run_keeps_the_epochs_its_checkpoint_saw(tmp_path):
    """The per-epoch curve travels in the checkpoint: a run resumed after epoch 1 plots epochs 1 and 2, and
    epoch 1 is the one the first run measured."""
    run = [*TINY, "--method", "lpa", "--seeds", "0", "--save-dir", str(tmp_path / "ckpt"), "--save-every", "1"]
    first, resumed = tmp_path / "first.json", tmp_path / "resumed.json"
    assert main([*run, "--json", str(first), "--plot", str(tmp_path / "first.png")]) == 0
    checkpoint = tmp_path / "ckpt" / "lpa-seed0" / "epoch-0001.pt"
    assert checkpoint.is_file()
    assert main([*run, "--save-dir", str(tmp_path / "again"), "--resume", str(checkpoint), "--json", str(resumed),
                 "--plot", str(tmp_path / "resumed.png")]) == 0
    full, continued = (json.loads(p.read_text())["runs"][0]["epochs"] for p in (first, resumed))
    assert len(continued) == 2 and continued[0] == full[0]
    assert continued[1]["test_accuracy"] == pytest.approx(full[1]["test_accuracy"])


@pytest.mark.parametrize("name, message", [
    ("curves.txt", "curves.txt: matplotlib cannot write .txt files; name a .png file"),
    ("curves", "curves: the name has no extension"),  # matplotlib would write curves.png instead
])
def test_plot_in_a_format_matplotlib_cannot_write_is_refused_before_training(monkeypatch, capsys, tmp_path, name,
                                                                              message):
    """matplotlib refused .txt only after the whole training, with a traceback."""
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--plot", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"argument --plot: {tmp_path}/{message}" in err, err


def test_plot_and_json_naming_one_file_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path):
    """The PNG replaced the JSON report at the end."""
    monkeypatch.setattr("lpa_programs.train.train_one", _no_training)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--json", str(tmp_path / "out.png"), "--plot", str(tmp_path / "." / "out.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "is also the --json file" in err, err
    assert list(tmp_path.iterdir()) == []


def test_train_loss_of_an_evaluated_epoch_is_that_epochs_mean_also_when_resumed(tmp_path):
    """With --eval-every 2 the loss logged at epoch 2 was the mean over epochs 1 and 2, and a run resumed after
    epoch 1 (whose partial sum is not checkpointed) logged another value: now all three runs log epoch 2's."""
    run = [*TINY, "--method", "lpa", "--seeds", "0"]
    every, second, resumed = (tmp_path / f"{name}.json" for name in ("every", "second", "resumed"))
    assert main([*run, "--eval-every", "1", "--json", str(every)]) == 0
    assert main([*run, "--eval-every", "2", "--json", str(second), "--save-dir", str(tmp_path / "ckpt"),
                 "--save-every", "1"]) == 0
    assert main([*run, "--eval-every", "2", "--json", str(resumed),
                 "--resume", str(tmp_path / "ckpt" / "lpa-seed0" / "epoch-0001.pt")]) == 0
    logged = [json.loads(p.read_text())["runs"][0]["epochs"] for p in (every, second, resumed)]
    assert [row["epoch"] for row in logged[1]] == [2] and [row["epoch"] for row in logged[2]] == [2]
    assert logged[1][0]["train_loss"] == logged[2][0]["train_loss"] == logged[0][1]["train_loss"], logged
