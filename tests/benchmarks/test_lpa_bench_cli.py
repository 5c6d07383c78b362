"""``lpa-bench --quick --json --plot`` runs on the CPU and writes the documented report and a PNG."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

import lpa_kernels
from lpa_bench import cli
from lpa_kernels.backend import interpreting
from lpa_bench.report import ROW_KEYS, SCHEMA

README = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "README.md"
META_KEYS = ("device", "torch", "triton", "git_commit", "date", "timer", "copy_gbps", "matmul_tflops", "backend_info")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run for the whole module (the CLI called in-process)."""
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "quick.json", out / "quick.png"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--quick", "--device", "cpu", "--threads", "1", "--json", str(json_path), "--plot", str(png_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads changed it for this whole process
    return json.loads(json_path.read_text()), png_path


def _rows(report, **match):
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def test_quick_report_has_schema_metadata_and_every_row_key(quick_run):
    report, _ = quick_run
    assert report["schema"] == SCHEMA
    missing = [k for k in META_KEYS if report["meta"].get(k) is None]
    assert not missing, f"metadata keys without a value: {missing}"
    assert report["meta"]["timer"] == "cpu-timer", "without a GPU the timer must be labelled cpu-timer"
    assert report["meta"]["cpu_threads"] == 1, "--threads sets torch's CPU threads"
    assert report["meta"]["copy_gbps"] > 0 and report["meta"]["matmul_tflops"]["float32"] > 0
    assert report["rows"], "the quick run produced no rows"
    for row in report["rows"]:
        assert set(row) == set(ROW_KEYS), f"row keys differ from the schema: {set(row) ^ set(ROW_KEYS)}"


def test_every_row_key_is_documented_in_the_readme():
    text = README.read_text()
    undocumented = [k for k in ROW_KEYS if f"`{k}`" not in text]
    assert not undocumented, f"row keys missing from benchmarks/README.md: {undocumented}"


def test_quick_run_times_every_op_with_the_reference_backend_and_eager(quick_run):
    report, _ = quick_run
    for op in ("perturb", "class_grad", "pgd_step_", "class_grad_pgd_step_", "linear_perturb", "head_pgd_"):
        measured = [r for r in _rows(report, op=op, impl="reference", bench="op") if r["time_ms"]]
        assert measured, f"no timed reference row for {op}"
    for row in _rows(report, bench="op", impl="eager"):
        assert row["time_ms"] and row["time_ms"] > 0, f"eager row without a time: {row}"
        assert "reference" in row["speedup"], "eager rows carry their speedup against the reference measured beside them"
    passes = {r["pass"] for r in _rows(report, op="perturb", impl="reference")}
    assert passes == {"fwd", "bwd", "fwd+bwd"}


def test_perturb_bytes_and_rates_follow_the_documented_formula(quick_run):
    report, _ = quick_run
    (row,) = _rows(report, op="perturb", impl="reference", **{"pass": "fwd"}, shape={"B": 64, "D": 32, "K": 5})
    # read h (64x32 fp32), write h~ (64x32), read delta (5x32), int64 labels (64)
    assert row["bytes"] == (2 * 64 * 32 + 5 * 32) * 4 + 64 * 8
    assert row["gbps"] == pytest.approx(row["bytes"] / row["time_ms"] / 1e6)
    assert row["frac_copy_bw"] == pytest.approx(row["gbps"] / report["meta"]["copy_gbps"])
    (bwd,) = _rows(report, op="perturb", impl="reference", **{"pass": "bwd"}, shape={"B": 64, "D": 32, "K": 5})
    # add mode: grad_h is grad_out itself, so read g and labels, write grad_delta
    assert bwd["bytes"] == (64 * 32 + 5 * 32) * 4 + 64 * 8
    (lin,) = _rows(report, op="linear_perturb", impl="reference", **{"pass": "fwd+bwd"}, shape={"B": 32, "IN": 16, "OUT": 24, "K": 5})
    assert lin["flops"] == 3 * 2 * 32 * 16 * 24, "fwd+bwd of a GEMM-based op counts three GEMMs"
    assert lin["frac_matmul"] == pytest.approx(lin["tflops"] / report["meta"]["matmul_tflops"]["float32"])


def test_quick_run_skips_compile_and_says_so(quick_run):
    report, _ = quick_run
    assert not _rows(report, impl="compile"), "compile must not run in --quick unless named in --backends"
    assert "compile" in report["meta"]["unavailable_impls"]
    assert all("compile peer skipped" in (r["notes"] or "") for r in _rows(report, op="perturb"))


def test_memory_rows_report_saved_bytes_and_no_cpu_peak(quick_run):
    report, _ = quick_run
    rows = _rows(report, bench="memory")
    assert {r["impl"] for r in rows} >= {"reference", "eager"}
    for row in rows:
        assert row["saved_bytes"] > 0 and row["peak_bytes"] is None, row
    # the eager chain relu(x @ W.T + b) + delta[y] keeps relu's (B, OUT) output for backward
    (eager,) = _rows(report, bench="memory", impl="eager")
    assert eager["saved_bytes"] >= 64 * 48 * 4


def test_training_step_rows_have_ratio_and_lower_forward_count(quick_run):
    pytest.importorskip("lpa_kernels.lpa", reason="the LPA training machinery has not landed")
    report, _ = quick_run
    rows = _rows(report, bench="train_step")
    runs = [("erm", None)] + [("lpa", t) for t in (0, 1, 3)]
    assert [(r["op"], r["variant"]["layer"], r["impl"], r["variant"]["steps"]) for r in rows] == (
        [("mlp_step", "3", *run) for run in runs]
        + [("resnet_step", "features.pool", *run) for run in runs]
        + [("resnet_step", "features.stage2", *run) for run in runs[1:]])
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["lower_forwards_per_step"] is not None
    assert rows[0]["plain_ms"] is None
    for row in rows:
        if row["impl"] == "erm":
            continue
        # against the plain step timed alongside each method's (timing.paired_median_ms)
        assert row["plain_ms"] > 0 and row["ratio"] == pytest.approx(row["time_ms"] / row["plain_ms"])
        assert row["lower_forwards_per_step"] == 1, "single pass and head/autograd PGD: the lower network runs once"
        # the head path's PGD steps never run the classifier module; the inner layer's re-run the upper network
        upper = 1 if row["variant"]["layer"] != "features.stage2" else 1 + row["variant"]["steps"]
        assert row["upper_forwards_per_step"] == upper, row


def test_training_step_methods_and_policies_come_from_the_registries(tmp_path):
    from lpa_kernels.lpa import DIRECTIONS, METHODS, RADII

    text = " ".join(cli.build_parser().format_help().split())
    for name in list(METHODS) + list(DIRECTIONS) + list(RADII):
        assert f"{name}:" in text, f"lpa-bench --help explains {name}"
    path = tmp_path / "steps.json"
    assert cli.main(["--quick", "--device", "cpu", "--ops", "train_step", "--train-methods", "la+lpa",
                     "--direction", "split", "--radius", "budget", "--json", str(path)]) == 0
    rows = _rows(json.loads(path.read_text()), bench="train_step", op="mlp_step")
    assert [(r["impl"], r["variant"]["steps"]) for r in rows] == [("erm", None), ("la+lpa", 0), ("la+lpa", 1), ("la+lpa", 3)]
    assert all(r["error"] is None for r in rows) and rows[1]["variant"]["radius"] == "budget"


def test_plot_is_a_png(quick_run):
    _, png = quick_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_spent_reports_rows_as_skipped(tmp_path):
    path = tmp_path / "skipped.json"
    cli.main(["--quick", "--device", "cpu", "--ops", "perturb", "--budget-s", "0", "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["time_ms"] is None and "budget" in r["error"] for r in rows)


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
def test_triton_interpreter_is_timed_only_when_asked():
    device = torch.device("cpu")
    impls, _, unavailable = cli.choose_impls(device, None, quick=True)
    assert "triton" not in impls and "triton" in unavailable
    impls, notes, _ = cli.choose_impls(device, ["triton", "eager"], quick=True)
    assert impls == ["triton", "eager"] and "interpreter" in notes["triton"]


def _no_benchmark(*_args, **_kw):
    raise AssertionError("the benchmark started before every option was checked")


def _refused(monkeypatch, capsys, argv) -> str:
    """lpa-bench's one error line for ``argv``, checked to come before any measurement, with exit status 2."""
    monkeypatch.setattr(cli, "device_peaks", _no_benchmark)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("lpa-bench: error: "), err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--ops", "nonsense"], "argument --ops: invalid choice: 'nonsense'"),
    (["--threads", "0"], "argument --threads: must be >= 1 and <= "),
    (["--threads", "100000"], "argument --threads: must be >= 1 and <= "),
    (["--budget-s", "-1"], "argument --budget-s: must be >= 0"),
])
def test_bad_arguments_are_one_line_errors(monkeypatch, capsys, argv, message):
    assert message in _refused(monkeypatch, capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages on a machine without CUDA")
@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "argument --device: cuda asked for, but torch sees no CUDA GPU"),
    (["--backends", "cuda"], "argument --backends: backend='cuda' is not available for a cpu tensor"),
], ids=["device-cuda", "backend-cuda"])
def test_unavailable_device_or_named_backend_is_refused_before_running(monkeypatch, capsys, argv, message):
    assert message in _refused(monkeypatch, capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_static_measure_without_a_gpu_is_refused_before_running(monkeypatch, capsys):
    from lpa_bench.static import report

    monkeypatch.setattr(report, "build_report", _no_benchmark)
    err = _static_refused(capsys, ["--measure"])
    assert err.startswith("lpa-bench static: error: argument --measure: ") and "needs a CUDA GPU" in err, err


def _static_refused(capsys, argv) -> str:
    """``lpa-bench static``'s one error line for ``argv``, with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["static", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--arch", "foo"], "argument --arch: expected a CUDA arch such as 90a"),
    (["--arch", "sm90"], "argument --arch: expected a CUDA arch"),
    (["--arch", "12"], "argument --arch: expected a CUDA arch"),
    (["--foo"], "unrecognized arguments: --foo"),
    (["--json", "{tmp}"], "is a folder, not a file name"),
])
def test_static_bad_arguments_are_one_line_errors_before_compiling(monkeypatch, capsys, tmp_path, argv, message):
    from lpa_bench.static import report

    monkeypatch.setattr(report, "build_report", _no_benchmark)
    err = _static_refused(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert err.startswith("lpa-bench static: error: ") and message in err, err


def test_static_accepts_the_arch_spellings(monkeypatch):
    from lpa_bench.static import report

    seen = []
    monkeypatch.setattr(report, "build_report", lambda archs, *a, **k: seen.append(archs) or {"stop": True})
    monkeypatch.setattr(report, "print_report", lambda r: None)
    assert cli.main(["static", "--arch", "90a", "sm_80", "SM_90", "120"]) == 0
    assert seen == [[90, 80, 120]]


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_a_result_that_cannot_be_written_mid_run_is_one_line(option, monkeypatch, capsys, tmp_path):
    """What the up-front path check cannot foresee (a full disk, a file system gone away) while writing the
    JSON report or the plot: one line, exit 2, no traceback."""
    def refuse(*_args):
        raise OSError(28, "No space left on device")

    if option == "--json":
        monkeypatch.setattr(cli, "write_json", refuse)
    else:
        lpa_plot = pytest.importorskip("lpa_bench.plot")  # needs matplotlib
        monkeypatch.setattr(lpa_plot, "plot", refuse)
    path = tmp_path / ("r.json" if option == "--json" else "r.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--device", "cpu", "--ops", "pgd_step_", option, str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"lpa-bench: error: argument {option}: cannot write {path}: "
                                "No space left on device (see lpa-bench --help)"], err


def test_static_measured_times_sit_next_to_the_modelled_ones():
    from lpa_bench.static import measure

    rows = [{"case": "a", "modelled_kernel_ms": 0.5}, {"case": "b", "modelled_kernel_ms": 1.0},
            {"case": "c", "modelled_kernel_ms": 2.0}]
    measure.add_measured(rows, {"a": {"measured_ms": 0.75}, "b": {"measured_error": "OutOfMemoryError: ..."}})
    assert [(r["measured_ms"], r["measured_over_modelled"]) for r in rows] == [(0.75, 1.5), (None, None), (None, None)]
    assert rows[1]["measured_error"].startswith("OutOfMemoryError") and "measured_error" not in rows[2]


def test_static_measure_times_both_head_pgd_forms_against_the_models_pick(monkeypatch):
    """Each form is forced in turn (the loop's steps see it), the model's pick is the GPU rule's, and the
    verdict compares the two times (a fake timer here: class space 1 ms, rows 2 ms)."""
    from lpa_bench.static import measure
    from lpa_kernels.head_pgd import loop

    forms, steps, rule = [], loop._steps, loop.use_class_space
    monkeypatch.setattr(loop, "_steps", lambda *args, **kwargs: (forms.append(args[15]), steps(*args, **kwargs))[1])

    def timer(fn):
        fn()
        return 1.0 if forms[-1] else 2.0
    sizes = [(48, 16, 6), (8, 16, 40)]  # many samples per class: class space on a GPU; K >> B: rows
    rows = measure.measure_head_forms("cpu", "triton", sizes, steps=2, timer=timer)
    assert forms == [True, False] * 4, "each shape and dtype: class space, then rows"
    assert [(r["B"], r["dtype"]) for r in rows] == [(48, "bfloat16"), (48, "float32"), (8, "bfloat16"), (8, "float32")]
    for r in rows:
        gpu_pick = loop.use_class_space(r["B"], r["D"], r["K"], 2, "add", getattr(torch, r["dtype"]), True)
        assert r["model_picks"] == ("class space" if gpu_pick else "rows")
        assert (r["measured_class_space_ms"], r["measured_rows_ms"], r["measured_faster"]) == (1.0, 2.0, "class space")
        assert r["model_agrees"] == gpu_pick and r["modelled_class_space_ms"] > 0 and r["modelled_rows_ms"] > 0
    assert loop.use_class_space is rule, "the rule is back after the measurement"


@pytest.mark.gpu
def test_static_measure_times_a_case_on_the_gpu():
    from lpa_bench.static import measure, shapes

    case = next(c for c in shapes.CASES if c.id == "perturb bwd channel float32")
    result = measure.measure_cases([case])[case.id]
    assert result.get("measured_ms", 0) > 0, result


def test_plot_without_matplotlib_is_refused_before_running_and_names_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    err = _refused(monkeypatch, capsys, ["--quick", "--plot", str(tmp_path / "p.png")])
    assert "needs matplotlib" in err and "lpa_kernels[bench]" in err


def test_output_that_is_a_folder_is_refused(monkeypatch, capsys, tmp_path):
    assert "argument --json: " in _refused(monkeypatch, capsys, ["--quick", "--json", str(tmp_path)])


def test_written_files_are_announced_and_readable_by_others(capsys, tmp_path):
    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    old_umask = os.umask(0o022)
    try:
        assert cli.main(["--quick", "--device", "cpu", "--ops", "pgd_step_", "--json", str(json_path),
                         "--plot", str(png_path)]) == 0
    finally:
        os.umask(old_umask)
    out = capsys.readouterr().out
    assert f"wrote {json_path}" in out and f"wrote {png_path}" in out
    for path in (json_path, png_path):
        assert path.stat().st_mode & 0o777 == 0o644, f"{path.name} is not 0644"


def test_console_lines_are_readable(quick_run):
    report, _ = quick_run
    meta = report["meta"]
    header = cli._header(meta, meta, meta["impls"])
    assert "{" not in header and "matmul float32 " in header and "TFLOP/s" in header, header
    memory = next(r for r in report["rows"] if r["bench"] == "memory" and r["error"] is None)
    assert cli._figure(memory).endswith("peak n/a on CPU")
    perturb = next(r for r in report["rows"] if r["op"] == "perturb" and r["time_ms"])
    assert "GB/s" in cli._figure(perturb) and "TFLOP/s" not in cli._figure(perturb), "elementwise: no flop rate"
    linear = next(r for r in report["rows"] if r["op"] == "linear_perturb" and r["bench"] == "op" and r["time_ms"])
    assert "TFLOP/s" in cli._figure(linear)
    steps = [r for r in report["rows"] if r["bench"] == "train_step" and r["target"]]
    verdicts = [cli._verdict(r) for r in steps]
    assert all(v.startswith("| target ") and r["target"] in v for v, r in zip(verdicts, steps)), verdicts
    assert {v.split(":")[0] for v in verdicts} <= {"| target met", "| target MISSED", "| target not measured here"}


@pytest.mark.gpu
def test_quick_run_on_the_gpu_times_the_fast_backends_with_do_bench(tmp_path):
    path = tmp_path / "gpu.json"
    info = lpa_kernels.backend_info()
    fast = [b for b in ("triton", "cuda") if info[b]["available"]]  # naming an unavailable one is an error
    cli.main(["--quick", "--device", "cuda", "--ops", "perturb", "linear_perturb", "memory",
              "--backends", "reference", *fast, "eager", "matmul", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["meta"]["timer"] == "do_bench"
    timed = {r["impl"] for r in report["rows"] if r["bench"] == "op" and r["time_ms"]}
    assert {"reference", "triton", "eager", "matmul"} <= timed, f"timed implementations: {timed}"
    peaks = [r["peak_bytes"] for r in report["rows"] if r["bench"] == "memory" and r["error"] is None]
    assert peaks and all(p is not None and p > 0 for p in peaks), "GPU memory rows need peak_bytes"


@pytest.mark.parametrize("argv, message", [
    (["--plot", "{tmp}/p.xyz"], "argument --plot: {tmp}/p.xyz: matplotlib cannot write .xyz files"),
    (["--plot", "{tmp}/pnoext"], "argument --plot: {tmp}/pnoext: the name has no extension"),
    (["--json", "{tmp}/same.png", "--plot", "{tmp}/same.png"], "is also the --json file"),
    (["--json", ""], "argument --json: the file name is empty"),
], ids=["unknown-format", "no-extension", "same-file", "empty-json"])
def test_output_names_that_would_fail_or_mislead_are_refused_up_front(monkeypatch, capsys, tmp_path, argv, message):
    """A plot format matplotlib cannot write crashed after the whole run; a name without extension got .png
    appended behind the user's back; the PNG replaced a --json of the same name; --json '' wrote nothing."""
    pytest.importorskip("matplotlib")
    err = _refused(monkeypatch, capsys, ["--quick", *[a.format(tmp=tmp_path) for a in argv]])
    assert message.format(tmp=tmp_path) in err, err
    assert not list(tmp_path.iterdir()), "nothing may be written before the options are checked"


@pytest.mark.parametrize("argv, op", [
    (["--ops", "perturb", "class_grad", "--backends", "matmul"], "perturb"),
    (["--ops", "head_pgd_", "--backends", "compile"], "head_pgd_"),
    (["--ops", "memory", "--backends", "matmul"], "memory"),
])
def test_backends_that_give_an_op_no_row_are_refused(monkeypatch, capsys, argv, op):
    """Peers an op lacks are dropped for it; when that leaves the op nothing to time, the run would end with
    status 0 and no row for it."""
    err = _refused(monkeypatch, capsys, ["--quick", *argv])
    assert f"argument --backends: --ops {op} would have no row" in err, err


def test_dtype_spellings_of_one_dtype_time_it_once(tmp_path):
    """``fp32`` and ``float32`` name the same dtype: both given must not time every case twice."""
    path = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--threads", "1", "--ops", "pgd_step_", "--backends", "reference",
                     "--dtypes", "fp32", "float32", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    cases = [json.dumps([r["shape"], r["variant"], r["pass"], r["dtype"]], sort_keys=True) for r in rows]
    assert rows and len(cases) == len(set(cases)), "a case was timed twice"


def test_an_interrupted_run_keeps_its_rows_and_says_it_did_not_finish(monkeypatch, capsys, tmp_path):
    """Ctrl-C (or gpu_session.sh's timeout --signal=INT) during a section lost the rows measured in it and
    ended in a traceback; the report must hold every row measured, marked unfinished, with one line, 130."""
    from lpa_bench import training

    measure, calls = training._measure, []

    def interrupt_the_second(*args, **kw):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kw)

    monkeypatch.setattr(training, "_measure", interrupt_the_second)
    path = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        code = cli.main(["--quick", "--device", "cpu", "--threads", "1", "--ops", "train_step", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "interrupted" in err and str(path) in err, err
    report = json.loads(path.read_text())
    assert report["finished"] is False
    assert [(r["impl"], r["time_ms"] is not None) for r in report["rows"]] == [("erm", True)]


def test_a_completed_run_says_it_finished(quick_run):
    report, _ = quick_run
    assert report["finished"] is True
    assert report["meta"]["copy_bytes"] > 0, "the copy's size goes with its bandwidth"


def test_row_notes_are_printed_with_the_row(capsys):
    """Notes such as "compile peer skipped" were only in the JSON: the console table showed the rows as if
    nothing were left out."""
    assert cli.main(["--quick", "--device", "cpu", "--threads", "1", "--ops", "pgd_step_"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [l for l in lines if l.split()[:1] == ["pgd_step_"]]
    assert rows and all(l.endswith("[note 1]") for l in rows), rows
    notes = [l.strip() for l in lines if l.strip().startswith("note ")]
    assert notes == [f"note 1: {cli.COMPILE_SKIPPED}"], "the note's text is printed once, after its first row"


def test_train_step_targets_are_lpa_s_only():
    """The SPEC's step targets (1.05x the plain step at T = 0, lower network once) are LPA's; other methods
    (adversarial training on the input runs the lower network more) were held to them and shown MISSED."""
    from lpa_bench import training
    from lpa_bench.runner import Budget

    rows = list(training._network_rows(training.NETWORKS["mlp"], "quick", torch.device("cpu"), Budget(None), True,
                                       ["lpa", "adv"], {}))
    lpa = [r for r in rows if r["impl"] == "lpa"]
    other = [r for r in rows if r["impl"] == "adv"]
    assert lpa and all(r["target"] for r in lpa)
    assert other and all(r["target"] is None and r["target_met"] is None and r["ratio"] for r in other)


def test_memory_target_is_not_met_when_the_peak_is_unmeasured():
    """On the CPU peak_bytes is None: a target on saved and peak bytes is then not measured, not met."""
    from lpa_bench.memory import _targets

    eager = {"impl": "eager", "saved_bytes": 100, "peak_bytes": None, "target": None, "target_met": None}
    fast = dict(eager, impl="triton", saved_bytes=50)
    _targets([fast, eager])
    assert fast["target"] and fast["target_met"] is None
    measured = [dict(fast, peak_bytes=10), dict(eager, peak_bytes=20)]
    _targets(measured)
    assert measured[0]["target_met"] is True


def test_training_plot_names_each_method_s_bars():
    """With several --train-methods the bars of one network, layer and T had one label and overlapped, under a
    y axis that called every method LPA."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lpa_bench.plot import _train_panel

    rows = [{"impl": m, "op": "mlp_step", "variant": {"layer": "3", "steps": 1}, "ratio": 1.2} for m in ("lpa", "adv")]
    fig, ax = plt.subplots()
    _train_panel(ax, rows)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    plt.close(fig)
    assert len(set(labels)) == 2 and all(any(m in l for l in labels) for m in ("lpa", "adv")), labels
    assert not ax.get_ylabel().startswith("LPA"), ax.get_ylabel()
