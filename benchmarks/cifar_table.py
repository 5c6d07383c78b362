"""Markdown tables from ``lpa-train --json`` reports (``benchmarks/reproduce_cifar.sh``): per report a table of
top-1 error (100 - accuracy, mean ± std over seeds) at the last epoch and at the best evaluated epoch, and
the many/medium/few-shot error.

    python -m lpa_bench.cifar_table out/cifar10-lt.json out/cifar100-lt.json > tables.md
"""

from __future__ import annotations

import argparse
import json
import statistics

from lpa_programs.cli import Parser


def _cell(values: list[float]) -> str:
    errors = [100.0 - v for v in values if v == v]
    if not errors:
        return "-"
    spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
    return f"{statistics.fmean(errors):.2f} ± {spread:.2f}"


def table(report: dict) -> str:
    recipe = report.get("recipe", {}).get("name", "no recipe")
    lines = [f"### {report['dataset']['name']} ({recipe}; {'finished' if report['finished'] else 'UNFINISHED'})", "",
             "| method | seeds | error, last | error, best epoch | many | medium | few |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in report["runs"]):
        runs = [r for r in report["runs"] if r["method"] == method]
        cells = [_cell([r.get(key, r["overall"]) for r in runs]) for key in ("last", "best")]
        cells += [_cell([r[group] for r in runs]) for group in ("many", "medium", "few")]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _report(path: str) -> dict:
    """The ``lpa-train --json`` report at ``path`` (``argparse.ArgumentTypeError``: why it is not one)."""
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or not {"dataset", "finished", "runs"} <= set(report):
        raise argparse.ArgumentTypeError(f"{path} is not an lpa-train --json report")
    problem = _structure_problem(report)
    if problem:
        raise argparse.ArgumentTypeError(f"{path} is not an lpa-train --json report: {problem}")
    return report


def _structure_problem(report: dict) -> str:
    """What ``table`` would trip over in ``report`` ("" when nothing)."""
    if not isinstance(report["dataset"], dict) or not isinstance(report["dataset"].get("name"), str):
        return "dataset is not an object with a name"
    if not isinstance(report["runs"], list):
        return "runs is not a list"
    for index, run in enumerate(report["runs"]):
        if not isinstance(run, dict) or not isinstance(run.get("method"), str):
            return f"runs[{index}] is not an object with a method"
        for key in ("overall", "many", "medium", "few") + tuple(k for k in ("last", "best") if k in run):
            if key not in run:
                return f"runs[{index}] has no {key}"
            if isinstance(run[key], bool) or not isinstance(run[key], (int, float)):
                return f"runs[{index}].{key} is {json.dumps(run[key])}, not an accuracy"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lpa_bench.cifar_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=_report, metavar="REPORT.json",
                        help="lpa-train --json reports (benchmarks/reproduce_cifar.sh writes them); one table each")
    for report in parser.parse_args(argv).reports:
        print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
