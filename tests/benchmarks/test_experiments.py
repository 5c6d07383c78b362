"""The layer-sweep experiment and the CIFAR results-table writer, on tiny runs."""

import json

import pytest

from lpa_bench import cifar_table, layer_sweep


def test_layer_sweep_writes_gains_diagnostics_and_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert layer_sweep.main(["--datasets", "digits-lt", "--seeds", "0", "1", "--epochs", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "layer_sweep.json").read_text())["results"]["digits-lt"]
    assert list(rows) == ["erm"] + [f"lpa@{layer}" for layer in layer_sweep.LAYERS] + ["lpl@logits"]
    assert rows["erm"]["gain"]["values"] == [0.0, 0.0]
    for layer in layer_sweep.LAYERS:
        row = rows[f"lpa@{layer}"]
        assert len(row["expansive_fraction"]) == len(row["class_gain"]) == 10
        assert all(0 <= f <= 1 for f in row["expansive_fraction"]) and set(row["direction"]) <= {-1.0, 0.0, 1.0}
        assert row["amplification"]["mean"] > 0 and len(row["gain"]["values"]) == 2
    assert (tmp_path / "layer_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "lpa@features.0" in capsys.readouterr().out


def test_cifar_table_reports_error_of_last_and_best_epoch(tmp_path):
    run = dict(many=90.0, medium=80.0, few=50.0)
    report = {"dataset": {"name": "cifar10-lt"}, "recipe": {"name": "la-resnet32"}, "finished": True, "runs": [
        dict(run, method="la", seed=0, overall=70.0, last=70.0, best=72.0),
        dict(run, method="la", seed=1, overall=74.0, last=74.0, best=74.0)]}
    text = cifar_table.table(report)
    # errors: last 30 and 26 -> 28.00 ± 2.83; best 28 and 26 -> 27.00 ± 1.41
    assert "| la | 2 | 28.00 ± 2.83 | 27.00 ± 1.41 | 10.00 ± 0.00 | 20.00 ± 0.00 | 50.00 ± 0.00 |" in text
    assert "la-resnet32" in text and "UNFINISHED" not in text


def test_cifar_table_reads_reports_and_refuses_anything_else_in_one_line(tmp_path, capsys):
    report = {"dataset": {"name": "cifar10-lt"}, "finished": False, "runs": [
        dict(method="erm", seed=0, overall=60.0, many=80.0, medium=60.0, few=30.0)]}
    (tmp_path / "good.json").write_text(json.dumps(report))
    assert cifar_table.main([str(tmp_path / "good.json")]) == 0
    assert "| erm | 1 | 40.00 ± 0.00 |" in capsys.readouterr().out
    (tmp_path / "other.json").write_text("[1, 2]")
    for argv, message in (([str(tmp_path / "missing.json")], "cannot read"), ([str(tmp_path / "other.json")],
                          "is not an lpa-train --json report"), ([], "the following arguments are required")):
        with pytest.raises(SystemExit) as exit_:
            cifar_table.main(argv)
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(error) == 1 and message in error[0], error
    with pytest.raises(SystemExit) as exit_:
        cifar_table.main(["--help"])
    assert exit_.value.code == 0 and "REPORT.json" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/afile"], "argument --out: cannot create the folder"),
    (["--epochs", "0"], "python -m lpa_bench.layer_sweep: error: argument --epochs: must be >= 1"),
])
def test_layer_sweep_refuses_bad_options_before_training(monkeypatch, capsys, tmp_path, argv, message):
    """An --out that is a file failed after the whole sweep; --epochs 0 was refused in lpa-train's name."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(layer_sweep, "run", lambda *a: pytest.fail("trained before checking the options"))
    with pytest.raises(SystemExit) as exit_:
        layer_sweep.main(["--datasets", "digits-lt", "--seeds", "0", *[a.format(tmp=tmp_path) for a in argv]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("report, message", [
    ({"dataset": {"name": "x"}, "finished": True, "runs": [{"method": "erm"}]}, "runs[0] has no overall"),
    ({"dataset": "cifar10-lt", "finished": True, "runs": []}, "dataset is not an object with a name"),
    ({"dataset": {"name": "x"}, "finished": True, "runs": [dict(method="erm", overall=90, many=None, medium=80, few=70)]},
     "runs[0].many is null, not an accuracy"),
], ids=["no-overall", "dataset-string", "null-group"])
def test_cifar_table_refuses_a_malformed_report_in_one_line(tmp_path, capsys, report, message):
    """Such reports passed the top-level check and then crashed in the table with a traceback."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_:
        cifar_table.main([str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(error) == 1 and str(path) in error[0] and message in error[0], error
