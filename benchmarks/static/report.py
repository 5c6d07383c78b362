"""``lpa-bench static``: the GPU-free performance report (issue 10). See benchmarks/README.md.

1. every Triton kernel of the shape set (``shapes.CASES``) compiled per arch: registers, spills, shared
   memory, 128-bit vs narrower global accesses, tensor-core instructions, atomics, grid vs 132 SMs;
   and the built CUDA C++ extension's kernels (``cuda_extension``);
2. the roofline model per case (``roofline``), every time labelled modelled;
3. launches and host reads per LPA training step (``steps``);
4. with ``--measure``, on a GPU: each case's measured time next to its modelled one, and ``head_pgd_``'s two
   forms timed side by side against the form the model picks (``measure``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time

from lpa_bench.static import compile_worker, cuda_extension, measure, roofline, shapes, steps
from lpa_programs.cli import Parser, check_writable, write_json_atomically, write_or_exit

# the CUDA archs --arch takes: Volta (sm_70) to Blackwell (sm_120/121)
MIN_ARCH, MAX_ARCH = 70, 121

SHAPES_PLAN = "lpa_bench.static.shapes"


def parse_arch(text: str) -> int:
    """``90a``/``sm_90a``/``90`` -> 90 (Triton compiles capability 90 for sm_90a); an argparse ``type``."""
    digits = text.lower().removeprefix("sm_").rstrip("af")
    if not digits.isdigit() or not MIN_ARCH <= int(digits) <= MAX_ARCH:
        raise argparse.ArgumentTypeError(f"expected a CUDA arch such as 90a, sm_80 or 120 (sm_{MIN_ARCH} to "
                                         f"sm_{MAX_ARCH}), got {text!r}")
    return int(digits)


def _nvcc_version() -> str | None:
    from lpa_kernels._cuda_build import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else None


def metadata(argv, archs) -> dict:
    import torch
    import triton

    from lpa_bench.report import git_commit

    return {"schema": "lpa-bench-static/1", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "git_commit": git_commit(), "triton": triton.__version__, "torch": torch.__version__,
            "nvcc": _nvcc_version(), "python": platform.python_version(), "argv": list(argv),
            "archs": [f"sm_{a}" + ("a" if a == 90 else "") for a in archs], "h100_model": roofline.H100,
            "note": "compiled-code facts and MODELLED times; nothing here ran on a GPU"}


def build_report(archs, argv=(), measured: bool = False) -> dict:
    """The report; with ``measured`` (a CUDA GPU needed) each roofline row also gets its measured time."""
    start = time.perf_counter()
    triton_summary = compile_worker.run(SHAPES_PLAN, archs)
    if "unavailable" in triton_summary:
        triton_summary = {"compiled": [], "failed": [], "recorded": [], "aten_launches": {},
                          "unavailable": triton_summary["unavailable"]}
    cuda_rows, cuda_note = cuda_extension.cuda_kernel_rows(tuple(f"sm_{a}" + ("a" if a == 90 else "") for a in archs))
    first_arch = [e for e in triton_summary["compiled"] if e["arch"] == archs[0]]
    report = {
        "meta": metadata(argv, archs),
        "triton_kernels": triton_summary["compiled"], "triton_failed": triton_summary["failed"],
        "triton_unavailable": triton_summary.get("unavailable"),
        "cuda_kernels": cuda_rows, "cuda_note": cuda_note or None,
        "roofline": roofline.roofline_rows(shapes.CASES, first_arch, triton_summary["recorded"],
                                           triton_summary["aten_launches"]),
        "head_pgd_targets": roofline.head_pgd_target_rows(),
        "steps": steps.run(),
    }
    if measured:
        import torch

        measure.add_measured(report["roofline"], measure.measure_cases(shapes.CASES))
        try:
            report["head_pgd_forms"] = measure.measure_head_forms()
        except Exception as error:  # noqa: BLE001 - the measured cases above must still be written
            report["head_pgd_forms_error"] = f"{type(error).__name__}: {error}"[:500]
        report["meta"]["measured_on"] = torch.cuda.get_device_name()
        report["meta"]["note"] = (f"compiled-code facts and MODELLED times (H100 SXM); measured_ms timed on "
                                  f"{report['meta']['measured_on']} (triton.testing.do_bench, median)")
    report["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    return report


def _grid_programs(grid) -> int:
    total = 1
    for g in grid:
        total *= g
    return total


def print_report(report: dict) -> None:
    print(f"lpa-bench static ({report['meta']['note']}); triton {report['meta']['triton']}, "
          f"nvcc {report['meta']['nvcc']}, commit {report['meta']['git_commit'][:10]}")
    print("\nTriton kernels (case, kernel, autotune config): regs spill(B) smem(B) ld128/ld<128 st128/st<128 "
          "tensor-core atomics programs/132SM")
    for e in report["triton_kernels"]:
        config = f" [{e['autotune_config']}]" if e.get("autotune_config") else ""
        programs = _grid_programs(e["grid"])
        print(f"  sm_{e['arch']} {e['variant']:<38} {e['kernel']:<42}{config}\n"
              f"      regs {e['registers']} spill {e['spill_store_bytes']} smem {e['shared']} "
              f"ld {e['global_loads_128']}/{e['global_loads_narrower']} st {e['global_stores_128']}/"
              f"{e['global_stores_narrower']} tc {e['tensor_core'] or '-'} atomics {e['atomics']} "
              f"programs {programs} ({programs / roofline.H100['sms']:.1f} waves of 132)")
    for e in report["triton_failed"]:
        print(f"  FAILED sm_{e['arch']} {e['variant']} {e['kernel']}: {e['error'][:200]}")
    print(f"\nCUDA C++ extension kernels: {len(report['cuda_kernels'])} {report['cuda_note'] or ''}")
    for r in report["cuda_kernels"]:
        print(f"  {r['arch']} {r['kernel'][:100]:<100} regs {r['registers']} local {r['local_bytes']} "
              f"ld {r['global_loads_128']}/{r['global_loads_narrower']} tc {r['tensor_core'] or '-'} "
              f"cp.async {r['async_copies']}")
    measured_on = report["meta"].get("measured_on")
    print("\nRoofline (MODELLED H100 SXM times, ms" + (f"; measured on {measured_on}" if measured_on else "; not measured")
          + "):")
    print(f"  {'case':<42} {'roofline':>9} {'kernels':>9} {'eager':>9} {'frac':>5} {'vs eager':>8}"
          + (f" {'measured':>9} {'meas/model':>10}" if measured_on else ""))
    for r in report["roofline"]:
        measured = ""
        if measured_on:
            measured = (f" {r['measured_ms']:9.4f} {r['measured_over_modelled']:10.2f}" if r["measured_ms"] is not None
                        else f" not measured: {r.get('measured_error', '')[:80]}")
        print(f"  {r['case']:<42} {r['modelled_roofline_ms']:9.4f} {r['modelled_kernel_ms']:9.4f} "
              f"{r['modelled_eager_ms']:9.4f} {r['modelled_fraction_of_roofline']:5.2f} "
              f"{r['modelled_speedup_vs_eager']:7.2f}x{measured}")
    print(f"\nhead_pgd_ against issue 11's targets (MODELLED H100 SXM times, ms; l2, add, "
          f"T = {roofline.HEAD_TARGET_STEPS}): step within {roofline.HEAD_TARGET_RATIO}x of its two GEMMs; "
          f"T steps faster than ONE autograd PGD step (autograd.grad in delta: one backward GEMM; with W's "
          f"gradient too, issue 11's count, in brackets)")
    print(f"  {'B':>5} {'D':>5} {'K':>6} {'dtype':<9} {'form':<18} {'launch':>6} {'step':>9} {'2 GEMMs':>9} "
          f"{'ratio':>6} {'T steps':>9} {'autograd':>9} {'ratio':>6}  where the model misses")
    for r in report.get("head_pgd_targets", []):
        print(f"  {r['B']:5d} {r['D']:5d} {r['K']:6d} {r['dtype']:<9} {r['formulation']:<18} "
              f"{r['launches_per_step']:6.3g} {r['modelled_step_ms']:9.4f} {r['modelled_two_gemms_ms']:9.4f} "
              f"{r['step_over_gemms']:5.2f}x {r['modelled_head_pgd_T3_ms']:9.4f} "
              f"{r['modelled_one_autograd_step_ms']:9.4f} {r['T3_over_one_autograd_step']:5.2f}x "
              f"[{r['modelled_head_pgd_T3_ms'] / r['modelled_one_autograd_step_with_weight_grad_ms']:4.2f}x]  "
              f"{r['why'] or 'both targets met'}")
    if report.get("head_pgd_forms"):
        print(f"\nhead_pgd_'s two forms measured side by side on {measured_on} (ms per call, T = "
              f"{roofline.HEAD_TARGET_STEPS}; modelled H100 times beside them) against the model's pick:")
        for r in report["head_pgd_forms"]:
            measured = "  ".join(f"{n.replace('_', ' ')} {r[f'measured_{n}_ms'] or float('nan'):.4f} "
                                 f"(model {r[f'modelled_{n}_ms']:.4f})" for n in ("class_space", "rows"))
            print(f"  {r['B']:5d} {r['D']:5d} {r['K']:6d} {r['dtype']:<9} {measured}  model picks "
                  f"{r['model_picks']}, measured faster: {r['measured_faster']}")
    print("\nPer training step (aten launches, Triton launches, host reads):")
    for r in report["steps"]:
        method = r["method"] + ("" if r["steps"] is None else f" T={r['steps']}")
        print(f"  {r['model']:<6} {r['layer']:<6} {r['backend']:<10} {method:<9} aten {r['aten_launches']:4d}  triton "
              f"{r['triton_launches']:3d}  host reads {r['host_reads']} {r['host_read_kinds']}")


def main(argv) -> int:
    p = Parser(prog="lpa-bench static", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--arch", nargs="+", type=parse_arch, default=[90, 80], metavar="ARCH",
                   help="CUDA archs to compile the Triton kernels for (default: 90a 80)")
    p.add_argument("--measure", action="store_true",
                   help="also time each case on the GPU (triton.testing.do_bench) next to its modelled time")
    args = p.parse_args(argv)
    if args.measure and (reason := measure.unavailable_reason()):
        p.error(f"argument --measure: {reason}")
    if args.json and check_writable(args.json):
        p.error(f"argument --json: {check_writable(args.json)}")
    report = build_report(list(dict.fromkeys(args.arch)), ["static", *argv], measured=args.measure)
    print_report(report)
    if args.json:
        write_or_exit(p, "--json", args.json, lambda: write_json_atomically(args.json, report))
    return 0
