"""``python -m lpa_bench.profile_step`` (run by gpu_session.sh) profiles every method on each network."""

from __future__ import annotations

import json

import pytest

from lpa_bench import profile_step


@pytest.mark.parametrize("model, layer", [("mlp", None), ("resnet", "features.stage2")])
def test_profile_step_reports_each_method(tmp_path, model, layer):
    path = tmp_path / "profile.json"
    argv = ["--tier", "quick", "--steps", "1", "--model", model, "--json", str(path)] + (["--layer", layer] if layer else [])
    profile_step.main(argv)
    report = json.loads(path.read_text())
    assert report["model"] == model and report["layer"] == (layer or "3")
    assert [r["method"] for r in report["results"]] == ["erm", "lpa T=0", "lpa T=1", "lpa T=3"]
    for r in report["results"]:
        assert r["launches_per_step"] > 0 and r["heaviest"], r


def test_profile_step_refuses_a_layer_the_network_does_not_time(capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--tier", "quick", "--model", "resnet", "--layer", "features.stage9"])
    assert exit_.value.code == 2
    assert "--layer: 'features.stage9'" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_profile_step_refuses_fewer_than_one_profiled_step(capsys, steps):
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--tier", "quick", "--steps", steps])
    assert exit_.value.code == 2
    assert f"--steps: must be at least 1 (got {steps})" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [("", "the file name is empty"), ("afile/x.json", "cannot create the folder")])
def test_profile_step_refuses_an_unwritable_json_before_profiling(monkeypatch, capsys, tmp_path, name, message):
    """An unwritable --json surfaced as a traceback after every method was profiled."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(profile_step, "_profile", lambda *a, **k: pytest.fail("profiled before checking --json"))
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--tier", "quick", "--json", str(tmp_path / name) if name else ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"argument --json: " in err and message in err, err


def test_profile_step_creates_the_json_s_folder(monkeypatch, tmp_path):
    """As lpa-bench does: a --json in a folder not made yet is written there (atomically), not refused."""
    monkeypatch.setattr(profile_step, "_profile", lambda name, steps, *a: {
        "method": name, "launches_per_step": 1.0, "device_ms_per_step": 0.0, "host_ms_per_step": 0.0, "heaviest": []})
    path = tmp_path / "new" / "profile.json"
    profile_step.main(["--tier", "quick", "--steps", "1", "--json", str(path)])
    assert len(json.loads(path.read_text())["results"]) == 4
