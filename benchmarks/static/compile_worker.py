"""Subprocess that records a launch plan's Triton launches and compiles them for CUDA archs.

``python -m lpa_bench.static.compile_worker MODULE ARCH [ARCH ...]`` prints one JSON line:
``{"triton", "expected", "recorded", "aten_launches", "compiled", "failed"}`` or ``{"unavailable": reason}`` when
Triton's CUDA compiler cannot run here. ``MODULE`` is a launch plan: a module with

- ``record(recorder)``: calls launchers or public ops through ``recorder.call(variant, fn, *args)``;
- ``configs_to_compile(arch, archs, launch)``: the autotune configs to compile for this launch on
  this arch (``[None]`` for a plain kernel, ``[]`` to skip it there);
- ``INSPECT``: whether to add resource usage and PTX/SASS facts to each entry (slower);
- ``MODEL_H100`` (optional, default True): see ``capture.recording``.

:func:`run` starts it with ``TRITON_INTERPRET=0`` (the compiler, not the CPU interpreter, must back
``triton.jit`` when the kernel modules are imported) and a fresh Triton cache (nothing reused).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lpa_bench.static.capture import Compiler, launched_kernels, recording

KERNEL_MODULES = (
    "lpa_kernels._triton_common",
    "lpa_kernels.perturb.triton_kernels",
    "lpa_kernels.pgd.triton_kernels",
    "lpa_kernels.linear_perturb.triton_kernels",
    "lpa_kernels.head_pgd.triton_kernels",
    "lpa_kernels.head_pgd.triton_fused",
    "lpa_kernels.step_update.triton_kernels",
)
REPO = Path(__file__).resolve().parents[2]


def _compiler_unavailable(arch: int) -> str:
    """Why Triton cannot compile for CUDA here ("" when it can): a one-line probe kernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)

    try:
        triton.compile(ASTSource(fn=probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                 constexprs={"BLOCK": 32}), target=GPUTarget("cuda", arch, 32))
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"[:2000]
    return ""


def compile_plan(plan, archs: list[int]) -> dict:
    import triton

    with recording(getattr(plan, "MODEL_H100", True)) as recorder:
        plan.record(recorder)
    summary = {"triton": triton.__version__, "expected": launched_kernels(KERNEL_MODULES),
               "recorded": [[launch.name, launch.variant] for launch in recorder.launches],
               "aten_launches": recorder.aten_launches,
               "compiled": [], "failed": []}
    for arch in archs:
        compiler = Compiler(arch)
        for launch in recorder.launches:
            for config in plan.configs_to_compile(arch, archs, launch):
                entry = compiler.compile(launch, config, inspect=plan.INSPECT)
                summary["failed" if "error" in entry else "compiled"].append(entry)
    return summary


def run(plan_module: str, archs, timeout: float = 900) -> dict:
    """Run the worker for ``plan_module`` in a subprocess; its JSON summary."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "LPA_POISON": "0",
               "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run([sys.executable, "-m", "lpa_bench.static.compile_worker", plan_module,
                                 *map(str, archs)], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main() -> None:
    plan = importlib.import_module(sys.argv[1])
    archs = [int(a) for a in sys.argv[2:]]
    reason = _compiler_unavailable(archs[0])
    # Launchers' own prints must not end up after the JSON line.
    summary = {"unavailable": reason} if reason else compile_plan(plan, archs)
    sys.stdout.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    _main()
