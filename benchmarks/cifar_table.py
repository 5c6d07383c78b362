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
    return report


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lpa_bench.cifar_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=_report, metavar="REPORT.json",
                        help="lpa-train --json reports (benchmarks/reproduce_cifar.sh writes them); one table each")
    for report in parser.parse_args(argv).reports:
        print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
