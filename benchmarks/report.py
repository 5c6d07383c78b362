"""The JSON report: run metadata, the row schema, and the SPEC section 4 targets each row is held to.

Every row has every key of ``ROW_KEYS`` (None where it does not apply); benchmarks/README.md says
what each one means.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from lpa_programs.cli import write_json_atomically

SCHEMA = "lpa-bench/1"

ROW_KEYS = (
    "bench",         # "op" | "memory" | "train_step" | "lower_forwards"
    "op",            # op name, or "mlp_step" / "resnet_step" for the training benchmark
    "pass",          # "fwd" | "bwd" | "fwd+bwd" | "step"
    "impl",          # backend ("reference", "triton", "cuda") or peer ("eager", "compile", "matmul"), or method
    "dtype",
    "shape",         # dict of sizes (B, D, K, IN, OUT, T, HIDDEN ...)
    "variant",       # dict (mode, norm, activation, steps ...)
    "time_ms",       # median time of one call
    "timer",         # "do_bench" (GPU) or "cpu-timer"
    "bytes",         # bytes that must move, counted once (formula per op in README)
    "flops",
    "gbps",          # bytes / time
    "tflops",        # flops / time
    "frac_copy_bw",  # gbps / the copy bandwidth measured in this run
    "frac_matmul",   # tflops / the matmul rate measured in this run, same dtype (compute-bound ops)
    "speedup",       # {peer: peer time / this time} for the peers measured beside this row
    "ratio",         # train_step: this step time / plain_ms
    "plain_ms",      # train_step: the plain (erm) step's median, timed alongside this row's (timing.paired_median_ms)
    "lower_forwards_per_step",
    "upper_forwards_per_step",
    "saved_bytes",   # memory: bytes saved for backward beyond the inputs (saved-tensor hooks; any device)
    "peak_bytes",    # memory: torch.cuda.max_memory_allocated above the inputs (None on the CPU)
    "stats",         # train_step: method.stats() after the counted steps
    "target",        # the SPEC section 4 target this row is held to, in words
    "target_met",    # True / False, or None where it is not measured here (CPU timings, other dtypes)
    "notes",
    "error",         # why the row has no measurement (backend not implemented yet, time budget ...)
)


def new_row(**fields) -> dict:
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row keys {sorted(unknown)}")
    return {key: fields.get(key) for key in ROW_KEYS}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def metadata(device: torch.device, argv: list, tier: str, peaks: dict) -> dict:
    import lpa_kernels

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the machine
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "tier": tier,
        "timer": "do_bench" if device.type == "cuda" else "cpu-timer",
        "cpu_threads": torch.get_num_threads(),
        "copy_gbps": peaks.get("copy_gbps"),
        "copy_bytes": peaks.get("copy_bytes"),
        "matmul_tflops": peaks.get("matmul_tflops"),
        "backend_info": lpa_kernels.backend_info(),
    }


def write_json(path: str, meta: dict, rows: list, finished: bool) -> None:
    """Write atomically, so a run cut short by a timeout leaves the last complete report; ``finished``
    says whether the run completed (false in the copies written as the rows come)."""
    write_json_atomically(path, {"schema": SCHEMA, "finished": finished, "meta": meta, "rows": rows})


# ---- SPEC section 4 ------------------------------------------------------------------------------

FAST = ("triton", "cuda")

# (op, pass) -> [(description, check(row) -> bool or None)]; time targets apply to bf16 on a GPU.
_KERNEL_TARGETS = {
    ("perturb", "fwd"): [(">= 95% of copy bandwidth", lambda r: _at_least(r["frac_copy_bw"], 0.95)),
                         (">= 2x eager", lambda r: _at_least(_speedup(r, "eager"), 2.0))],
    ("perturb", "bwd"): [(">= 90% of copy bandwidth", lambda r: _at_least(r["frac_copy_bw"], 0.90)),
                         (">= 1.5x compile", lambda r: _at_least(_speedup(r, "compile"), 1.5)),
                         (">= 2x eager", lambda r: _at_least(_speedup(r, "eager"), 2.0))],
    ("linear_perturb", "fwd"): [("time <= 1.05x bare matmul", lambda r: _at_least(_speedup(r, "matmul"), 1 / 1.05)),
                                (">= 1.25x eager chain", lambda r: _at_least(_speedup(r, "eager"), 1.25))],
    ("linear_perturb", "bwd"): [("time <= 1.10x the two bare GEMMs", lambda r: _at_least(_speedup(r, "matmul"), 1 / 1.10))],
    ("linear_perturb", "fwd+bwd"): [(">= 1.25x eager chain", lambda r: _at_least(_speedup(r, "eager"), 1.25))],
}


def _speedup(row, peer):
    return (row["speedup"] or {}).get(peer)


def _at_least(value, bar):
    return None if value is None else bool(value >= bar)


def all_met(results):
    """A target of several parts: False when one is missed, None (not measured) when one is unmeasured."""
    if any(r is False for r in results):
        return False
    return None if any(r is None for r in results) else True


def apply_kernel_target(row: dict) -> None:
    """Fill ``target``/``target_met`` of a fast-backend op row (time targets: bf16 on a GPU only)."""
    targets = _KERNEL_TARGETS.get((row["op"], row["pass"]))
    if not targets or row["impl"] not in FAST:
        return
    row["target"] = "; ".join(text for text, _ in targets)
    if row["timer"] == "do_bench" and row["dtype"] == "bfloat16" and row["time_ms"] is not None:
        row["target_met"] = all_met([check(row) for _, check in targets])
