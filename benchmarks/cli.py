"""``lpa-bench``: kernel, memory and training-step benchmarks of lpa_kernels (see benchmarks/README.md).

Examples::

    lpa-bench --quick --json quick.json --plot quick.png          # under a minute, CPU or GPU
    lpa-bench --json results.json --plot results.png --budget-s 240
    lpa-bench --ops perturb linear_perturb --backends triton eager compile --dtypes bfloat16 float32
    lpa-bench static --json static.json --arch 90a 80              # compiled-code facts, modelled roofline
"""

from __future__ import annotations

import sys

import torch

from lpa_bench.memory import MEMORY_IMPLS, memory_rows
from lpa_bench.ops import OPS
from lpa_bench.report import metadata, write_json
from lpa_bench.runner import PEERS, Budget, op_impls, run_op
from lpa_bench.timing import device_peaks
from lpa_bench.training import train_rows
from lpa_kernels.backend import BACKENDS, resolve
from lpa_kernels.lpa import DIRECTIONS, METHODS, RADII, LPAConfig
from lpa_programs.cli import MAX_THREADS, Parser, check_writable, number, write_or_exit
from lpa_programs.plot import check_option as check_plot_option

SECTIONS = ("perturb", "linear_perturb", "train_step", "memory", "head_pgd_", "class_grad", "pgd_step_",
            "class_grad_pgd_step_")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPILE_SKIPPED = "compile peer skipped in --quick (compiling takes longer than the run; name it in --backends)"


def build_parser() -> Parser:
    p = Parser(prog="lpa-bench", description=__doc__.splitlines()[0].replace("``", ""),
               epilog="lpa-bench static [--json PATH] [--arch ARCH ...] [--measure]: the GPU-free compiled-code "
                      "report (registers, spills, access widths, a modelled roofline); lpa-bench static --help")
    p.add_argument("--json", metavar="PATH", help="write every row and the run's metadata as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="draw throughput vs size per op with the roofline (PNG; needs matplotlib: "
                        "pip install 'lpa_kernels[bench]')")
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing: finishes in under a minute")
    p.add_argument("--ops", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="OP",
                   help=f"what to run, among {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS + PEERS, metavar="IMPL",
                   help="backends and peers to time, among " + ", ".join(BACKENDS + PEERS) + " (default: every "
                        "backend available on the device, eager, compile and matmul; the Triton interpreter "
                        "only when named)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), metavar="DTYPE",
                   help=f"among {', '.join(sorted(DTYPES))} (default: bfloat16 on a GPU, the SPEC targets' "
                        "dtype; float32 on the CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (cuda when available), cpu or cuda (default: auto)")
    p.add_argument("--threads", type=number(int, 1, maximum=MAX_THREADS), default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 steadies CPU timings on a shared machine")
    p.add_argument("--train-methods", nargs="+", choices=METHODS, default=["lpa"], metavar="METHOD",
                   help="methods timed against the plain step in train_step, with T = 0, 1, 3: " + METHODS.help_text())
    p.add_argument("--direction", choices=DIRECTIONS, default=LPAConfig.direction,
                   help="train_step's direction policy: " + DIRECTIONS.help_text())
    p.add_argument("--radius", choices=RADII, default=LPAConfig.radius, help="train_step's radius policy: " + RADII.help_text())
    p.add_argument("--budget-s", type=number(float, 0), default=None,
                   help="wall-clock allowance for the sweep; later cases are reported as skipped")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def check_args(parser: Parser, args) -> torch.device:
    """Everything that would otherwise fail after the benchmark ran: the device, backends named but
    unavailable here, matplotlib for --plot, where the files go. Each is one error line, exit 2."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: cuda asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    for backend in [b for b in (args.backends or ()) if b in BACKENDS]:
        try:
            resolve(backend, device)
        except ValueError as exc:
            parser.error(f"argument --backends: {exc}")
    if args.json is not None and check_writable(args.json):
        parser.error(f"argument --json: {check_writable(args.json)}")
    check_plot_option(parser, args)  # matplotlib there, a format it writes, a writable path that is not --json's
    return device


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
            print(f"MISSED {r['op']} {r['pass']} {r['impl']} {r['dtype']} {_case(r)}: {r['target']}", flush=True)
    met = sum(r["target_met"] is True for r in held)
    missed = sum(r["target_met"] is False for r in held)
    print(f"SPEC targets: {met} met, {missed} missed, {len(held) - met - missed} not measured here", flush=True)


def _figure(r: dict) -> str:
    """The row's measurement in words."""
    if r["error"]:
        return f"-- {r['error']}"
    if r["bench"] == "memory":
        peak = "n/a on CPU" if r["peak_bytes"] is None else f"{r['peak_bytes']} B"  # a CUDA allocator figure
        return f"saved {r['saved_bytes']} B, peak {peak}"
    if r["bench"] == "train_step":
        ratio = "" if r["ratio"] is None else f", {r['ratio']:.3f}x plain"
        return (f"{r['time_ms']:.3f} ms{ratio}, lower fwd/step {r['lower_forwards_per_step']:g}, "
                f"upper fwd/step {r['upper_forwards_per_step']:g}")
    rate = f"{r['tflops']:.3f} TFLOP/s" if OPS[r["op"]].bound == "compute" else ""  # elementwise: ~0 flops
    return " ".join(filter(None, [f"{r['time_ms']:.4f} ms", f"{r['gbps']:.1f} GB/s", rate]))


VERDICTS = {True: "met", False: "MISSED", None: "not measured here"}


def _verdict(r: dict) -> str:
    """The target column: what the row is held to and how it did, the same words for every kind of row."""
    return f"| target {VERDICTS[r['target_met']]}: {r['target']}" if r["target"] else ""


def _case(r: dict) -> str:
    """The row's shape and variant as ``B=64,D=32,mode=add``."""
    return ",".join(f"{k}={v}" for k, v in {**(r["shape"] or {}), **(r["variant"] or {})}.items())


class RowPrinter:
    """Prints each row as one line. A row's ``notes`` (the Triton interpreter's times are no performance
    figure, a peer left out ...) would be lost on the screen otherwise and repeat on many rows: the line
    ends with ``[note N]`` and the note's text follows on a line of its own the first time it appears."""

    def __init__(self):
        self.numbers: dict = {}

    def print(self, r: dict) -> None:
        line = f"{r['op']:>20} {r['pass']:>7} {r['impl']:>9} {r['dtype'] or '':>8} {_case(r):<44} {_figure(r):<44}"
        new_note = r["notes"] and r["notes"] not in self.numbers
        if r["notes"]:
            number = self.numbers.setdefault(r["notes"], len(self.numbers) + 1)
            line = f"{line} [note {number}]"
        print(f"{line} {_verdict(r)}".rstrip(), flush=True)
        if new_note:
            print(f"{'':>20} note {self.numbers[r['notes']]}: {r['notes']}", flush=True)


def _header(meta: dict, peaks: dict, impls: list) -> str:
    matmul = ", ".join(f"{dtype} {rate:.3g}" for dtype, rate in peaks["matmul_tflops"].items())
    return (f"lpa-bench on {meta['device']} ({meta['timer']}); measured peaks: copy {peaks['copy_gbps']:.1f} GB/s, "
            f"matmul {matmul} TFLOP/s; timing {', '.join(impls)}")


def _write_json(parser: Parser, path: str, meta: dict, rows: list, finished: bool) -> None:
    """The report so far into ``path``; a write that fails (what ``check_args`` could not foresee) is one
    error line, exit 2 (the rows printed so far stay on the screen)."""
    write_or_exit(parser, "--json", path, lambda: write_json(path, meta, rows, finished))


def check_sections(parser: Parser, sections, impls: list, backends) -> None:
    """The ops asked for that none of the implementations asked for can time (``--backends matmul`` for
    ``perturb``, which has no bare-GEMM peer): refused, as the run would end with no row for them."""
    for section in sections:
        if section in OPS:
            timed = op_impls(OPS[section], impls)
            has = list(BACKENDS) + list(OPS[section].peers)
        elif section == "memory":
            timed = [i for i in impls if i in MEMORY_IMPLS]
            has = list(MEMORY_IMPLS)
        else:  # train_step times the --train-methods
            continue
        if not timed:
            parser.error(f"argument --backends: --ops {section} would have no row: it is timed with {', '.join(has)}, "
                         f"not with {' '.join(backends)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["static"]:  # the GPU-free report: benchmarks/static/
        from lpa_bench.static.report import main as static_main

        return static_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_args(parser, args)
    cuda = device.type == "cuda"
    tier = "quick" if args.quick else ("gpu" if cuda else "cpu")
    # bf16 and bfloat16 name one dtype: each is timed once
    dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtypes or (["bfloat16"] if cuda else ["float32"])))
    impls, notes, unavailable = choose_impls(device, args.backends, args.quick)
    if args.backends:
        check_sections(parser, dict.fromkeys(args.ops), impls, args.backends)
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        return _run(parser, args, argv, device, tier, dtypes, impls, notes, unavailable, budget)
    except KeyboardInterrupt:  # Ctrl-C, or gpu_session.sh's timeout --signal=INT
        kept = f"; {args.json} holds the rows measured so far" if args.json else ""
        print(f"lpa-bench: interrupted{kept}", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT, as if the signal had ended the process


def _run(parser: Parser, args, argv, device, tier, dtypes, impls, notes, unavailable, budget) -> int:
    """The sweep, the report rewritten after every row (``finished`` false until the sweep is complete)."""
    peaks = device_peaks(device, dtypes, args.quick)
    meta = metadata(device, argv, tier, peaks)
    meta["impls"], meta["unavailable_impls"] = impls, unavailable
    print(_header(meta, peaks, impls), flush=True)
    for name, reason in unavailable.items():
        print(f"  not timed: {name}: {reason}", flush=True)

    rows: list = []
    if args.json:  # from the start, so that a run stopped before its first row leaves its metadata
        _write_json(parser, args.json, meta, rows, finished=False)
    printer = RowPrinter()
    for section in dict.fromkeys(args.ops):
        if section == "train_step":
            new = train_rows(tier, device, budget, args.quick, [m for m in args.train_methods if m != "erm"],
                             dict(direction=args.direction, radius=args.radius))
        elif section == "memory":
            new = memory_rows(tier, dtypes, impls, device, budget)
        else:
            new = run_op(OPS[section], tier, dtypes, impls, device, peaks, budget, args.quick, notes)
        compile_skipped = (section in OPS and unavailable.get("compile") == COMPILE_SKIPPED
                           and "compile" in OPS[section].peers)
        for row in new:
            if compile_skipped:
                row["notes"] = "; ".join(filter(None, [row["notes"], COMPILE_SKIPPED]))
            printer.print(row)
            rows.append(row)
            if args.json:
                _write_json(parser, args.json, meta, rows, finished=False)
    _print_targets(rows)
    if args.json:
        _write_json(parser, args.json, meta, rows, finished=True)
        print(f"wrote {args.json}", flush=True)
    if args.plot:
        from lpa_bench.plot import plot  # matplotlib: checked to be there before the run

        write_or_exit(parser, "--plot", args.plot, lambda: plot(args.plot, meta, rows))
        print(f"wrote {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
