"""``lpa-bench``: kernel, memory and training-step benchmarks of lpa_kernels (see benchmarks/README.md).

Examples::

    lpa-bench --quick --json quick.json --plot quick.png          # under a minute, CPU or GPU
    lpa-bench --json results.json --plot results.png --budget-s 240
    lpa-bench --ops perturb linear_perturb --backends triton eager compile --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import sys

import torch

from lpa_bench.memory import memory_rows
from lpa_bench.ops import OPS
from lpa_bench.report import metadata, write_json
from lpa_bench.runner import Budget, run_op
from lpa_bench.timing import device_peaks
from lpa_bench.training import train_rows
from lpa_kernels.backend import BACKENDS, resolve

PEERS = ("eager", "compile", "matmul")
SECTIONS = ("perturb", "linear_perturb", "train_step", "memory", "head_pgd_", "class_grad", "pgd_step_",
            "class_grad_pgd_step_")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPILE_SKIPPED = "compile peer skipped in --quick (compiling takes longer than the run; name it in --backends)"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lpa-bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw throughput vs size per op with the roofline (PNG)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing: finishes in under a minute")
    p.add_argument("--ops", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="OP",
                   help=f"what to run, among {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS + PEERS, metavar="IMPL",
                   help="backends and peers to time (default: every backend available on the device, "
                        "eager, compile and matmul; the Triton interpreter only when named)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), metavar="DTYPE",
                   help="default: bfloat16 on a GPU (the SPEC targets' dtype), float32 on the CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 steadies CPU timings on a shared machine")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock allowance for the sweep; later cases are reported as skipped")
    return p.parse_args(argv)


def choose_impls(device: torch.device, requested, quick: bool):
    """``(impls, notes per impl, unavailable {impl: reason})``."""
    impls, notes, unavailable = [], {}, {}
    for backend in BACKENDS:
        if requested is not None and backend not in requested:
            continue
        try:
            resolve(backend, device)
        except ValueError as exc:
            unavailable[backend] = str(exc)
            continue
        if device.type == "cpu" and backend == "triton":
            if requested is None:
                unavailable[backend] = "the Triton CPU interpreter is not timed unless named in --backends"
                continue
            notes[backend] = "triton-interpreter (CPU): not a performance figure"
        impls.append(backend)
    for peer in PEERS:
        if requested is not None and peer not in requested:
            continue
        if peer == "compile" and quick and requested is None:
            unavailable[peer] = COMPILE_SKIPPED
            continue
        impls.append(peer)
    return impls, notes, unavailable


def _print_targets(rows) -> None:
    """One line per SPEC target missed, and the counts."""
    held = [r for r in rows if r["target"]]
    for r in held:
        if r["target_met"] is False:
            print(f"MISSED {r['op']} {r['pass']} {r['impl']} {r['dtype']} {r['shape']}: {r['target']}", flush=True)
    met = sum(r["target_met"] is True for r in held)
    missed = sum(r["target_met"] is False for r in held)
    print(f"SPEC targets: {met} met, {missed} missed, {len(held) - met - missed} not measured here", flush=True)


def _print_rows(rows) -> None:
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in {**(r["shape"] or {}), **(r["variant"] or {})}.items())
        if r["error"]:
            figure = f"-- {r['error']}"
        elif r["bench"] == "memory":
            figure = f"saved {r['saved_bytes']} B, peak {r['peak_bytes']} B"
        elif r["bench"] == "train_step":
            ratio = "" if r["ratio"] is None else f", {r['ratio']:.3f}x plain"
            figure = f"{r['time_ms']:.3f} ms{ratio}, lower fwd/step {r['lower_forwards_per_step']}"
        else:
            figure = f"{r['time_ms']:.4f} ms {r['gbps']:.1f} GB/s {r['tflops']:.3f} TFLOP/s"
        met = "" if r["target_met"] is None else f"  target {'met' if r['target_met'] else 'MISSED'}"
        print(f"{r['op']:>20} {r['pass']:>7} {r['impl']:>9} {r['dtype'] or '':>8} {shape:<44} {figure}{met}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    tier = "quick" if args.quick else ("gpu" if cuda else "cpu")
    dtypes = [DTYPES[d] for d in dict.fromkeys(args.dtypes or (["bfloat16"] if cuda else ["float32"]))]
    impls, notes, unavailable = choose_impls(device, args.backends, args.quick)
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks = device_peaks(device, dtypes, args.quick)
    meta = metadata(device, argv, tier, peaks)
    meta["impls"], meta["unavailable_impls"] = impls, unavailable
    print(f"lpa-bench on {meta['device']} ({meta['timer']}), copy {peaks['copy_gbps']:.1f} GB/s, "
          f"matmul {peaks['matmul_tflops']} TFLOP/s; timing {impls}", flush=True)
    for name, reason in unavailable.items():
        print(f"  not timed: {name}: {reason}", flush=True)

    rows: list = []
    for section in dict.fromkeys(args.ops):
        if section == "train_step":
            new = train_rows(tier, device, budget, args.quick)
        elif section == "memory":
            new = memory_rows(tier, dtypes, impls, device, budget)
        else:
            new = run_op(OPS[section], tier, dtypes, impls, device, peaks, budget, args.quick, notes)
            if unavailable.get("compile") == COMPILE_SKIPPED and "compile" in OPS[section].peers:
                for row in new:
                    row["notes"] = "; ".join(filter(None, [row["notes"], COMPILE_SKIPPED]))
        _print_rows(new)
        rows.extend(new)
        if args.json:
            write_json(args.json, meta, rows)
    _print_targets(rows)
    if args.plot:
        try:
            from lpa_bench.plot import plot

            plot(args.plot, meta, rows)
        except ImportError as exc:  # the JSON is written; only the picture is missing
            print(f"no plot: {exc} (pip install matplotlib)", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
