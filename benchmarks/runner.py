"""Run the op sweep: every shape x variant x dtype x pass, each implementation side by side."""

from __future__ import annotations

import itertools
import time
from typing import Iterator

import torch

from lpa_bench.ops import OpBench
from lpa_bench.report import apply_kernel_target, dtype_name, new_row
from lpa_bench.timing import median_ms, timer_name

PEERS = ("eager", "compile", "matmul")


class Budget:
    """A wall-clock allowance for the whole sweep; cases past it are reported as skipped."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def attempt(row: dict, budget: Budget, measure):
    """``measure()``, or None with ``row["error"]`` saying why: the budget is spent, or it raised (a
    backend not implemented yet, out of memory ...): one failing case never stops the sweep."""
    if budget.spent():
        row["error"] = "skipped: time budget (--budget-s) spent"
        return None
    try:
        return measure()
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return None


def pass_callable(op: OpBench, impl: str, inputs: dict, variant: dict, pass_: str):
    """The no-argument callable timed for ``pass_``.

    ``fwd`` runs under ``no_grad``; ``bwd`` times ``torch.autograd.grad`` of a forward output kept
    alive with ``retain_graph``; ``fwd+bwd`` times both. ``autograd.grad`` returns the gradients
    without accumulating into ``.grad``, so no extra read-modify-write is timed."""
    forward = op.call(impl, inputs, variant)
    if pass_ == "fwd":
        def run_fwd():
            with torch.no_grad():
                return forward()
        return run_fwd
    wrt = [inputs[name] for name in op.diff]
    if impl == "matmul":  # the bare GEMMs: only x and weight take part
        wrt = [inputs["x"], inputs["weight"]]
    out = forward()
    grad_out = torch.randn_like(out)
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), wrt, grad_out)


def _rates(row: dict, peaks: dict, bound: str) -> None:
    ms = row["time_ms"]
    if ms is None or ms <= 0:
        return
    row["gbps"] = row["bytes"] / ms / 1e6
    row["tflops"] = row["flops"] / ms / 1e9
    if peaks.get("copy_gbps"):
        row["frac_copy_bw"] = row["gbps"] / peaks["copy_gbps"]
    matmul = (peaks.get("matmul_tflops") or {}).get(row["dtype"])
    if bound == "compute" and matmul:
        row["frac_matmul"] = row["tflops"] / matmul


def _add_speedups(group: list) -> None:
    times = {r["impl"]: r["time_ms"] for r in group if r["time_ms"]}
    for row in group:
        if row["time_ms"]:
            row["speedup"] = {peer: t / row["time_ms"] for peer, t in times.items() if peer != row["impl"]}


def _case_rows(op: OpBench, shape: dict, variant: dict, dtype: torch.dtype, impls, device, peaks, budget, quick, notes) -> list:
    """Every pass of one (shape, variant, dtype), each implementation timed beside the others."""
    setup: dict = {}  # holds the error when the inputs cannot be made (budget, memory)
    inputs = attempt(setup, budget, lambda: op.make_inputs(shape, dtype, device))
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for pass_ in op.passes:
        group = []
        for impl in impls:
            row = new_row(bench="op", op=op.name, **{"pass": pass_}, impl=impl, dtype=dtype_name(dtype),
                          shape=dict(shape), variant=dict(variant), timer=timer_name(device),
                          bytes=op.nbytes(pass_, shape, itemsize, variant), flops=op.flops(pass_, shape, variant),
                          notes=notes.get(impl))
            if inputs is None:
                row["error"] = setup["error"]
            else:
                row["time_ms"] = attempt(row, budget, lambda: median_ms(
                    pass_callable(op, impl, inputs, variant, pass_), device, quick))
            _rates(row, peaks, op.bound)
            group.append(row)
        _add_speedups(group)
        for row in group:
            apply_kernel_target(row)
        rows.extend(group)
    return rows


def run_op(op: OpBench, tier: str, dtypes, impls, device: torch.device, peaks: dict, budget: Budget,
           quick: bool, notes: dict | None = None) -> Iterator[dict]:
    """Rows for one op, yielded case by case (a case's rows carry their speedups over each other, so they
    come together) for the caller to keep as they come. ``impls`` are the backends and peers to time;
    ``notes[impl]`` goes into that implementation's rows (e.g. "triton-interpreter")."""
    impls = op_impls(op, impls)
    for shape, variant, dtype in itertools.product(op.shapes[tier], op.variants(tier), dtypes):
        yield from _case_rows(op, shape, variant, dtype, impls, device, peaks, budget, quick, notes or {})
        if device.type == "cuda":  # the case's inputs are gone: hand their memory back
            torch.cuda.empty_cache()


def op_impls(op: OpBench, impls) -> list:
    """Those of ``impls`` that time ``op``: every backend, and the peers ``op`` has."""
    return [i for i in impls if i not in PEERS or i in op.peers]
