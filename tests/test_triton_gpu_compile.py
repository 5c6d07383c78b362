"""Every Triton kernel of the package compiles for NVIDIA GPUs (sm_90 = H100, sm_80 = A100), down to
PTX and cubin, without a GPU: a kernel using language the GPU compiler rejects fails here, not first on
the GPU machine. Run it under each Triton version the project supports (3.6 on the GPU machine, 3.9 here).

How: a subprocess with ``TRITON_INTERPRET=0`` (``triton.jit`` picks interpreter or compiler when the
kernel modules are imported, and the conftest turns the interpreter on in this process) replaces the
kernel launch (``JITFunction.run``, ``Autotuner.run``) by a recorder and calls every launcher with small
CPU tensors of each dtype and each mode/flag the launchers turn into compile-time variants. Each recorded
launch is then specialised exactly as ``JITFunction.run`` does it (Triton's own binder and
``_pack_args``: argument types, integer specialisation, pointer alignment, constexprs, options) for a CUDA
target and compiled with ``triton.compile``; an autotuned kernel is compiled once per config. Distinct
specialisations are compiled once. Nothing is cached between runs (a fresh Triton cache directory).
The subprocess prints a JSON summary; the tests read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = (
    "lpa_kernels.perturb.triton_kernels",
    "lpa_kernels.pgd.triton_kernels",
    "lpa_kernels.linear_perturb.triton_kernels",
    "lpa_kernels.head_pgd.triton_kernels",
)
ARCHS = (90, 80)  # H100, A100
DTYPES = ("float32", "float16", "bfloat16", "float64")
# To stay within about a minute on two cores: the first arch compiles every recorded variant, the
# others those of one dtype; an autotuned kernel compiles every config for one variant, its smallest
# config (the last) for the others.
OTHER_ARCH_DTYPE = "bfloat16"
EVERY_CONFIG_VARIANT = "bfloat16 scale gelu"


# --------------------------------------------------------------------------------------------------
# Subprocess side: record the launches, compile them.
# --------------------------------------------------------------------------------------------------


def _record_launches():
    """``[(variant, jit_function, args, kwargs, configs or None)]`` for every launch the launchers make."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from lpa_kernels.head_pgd import triton_kernels as head_pgd
    from lpa_kernels.linear_perturb import triton_kernels as linear
    from lpa_kernels.perturb import triton_kernels as perturb
    from lpa_kernels.pgd import triton_kernels as pgd

    launches, variant = [], [""]

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append((variant[0], self, args, kwargs, None))

    def record_autotuned(self, *args, grid, warmup, **kwargs):
        launches.append((variant[0], self.fn, args, kwargs, list(self.configs)))

    JITFunction.run, Autotuner.run = record_jit, record_autotuned

    def call(name, launcher, *args):
        """Run a launcher; it may fail once a kernel output it reads is garbage (nothing ran), after its
        launches are recorded, so errors are ignored here and missing launches caught by the tests."""
        variant[0] = name
        try:
            launcher(*args)
        except Exception:  # noqa: BLE001
            pass

    def rand(*shape, dtype):
        return torch.randn(shape).to(getattr(torch, dtype))

    for dt in DTYPES:
        acc = torch.float64 if dt == "float64" else torch.float32
        labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1] * 8)  # B = 64, K = 2
        for mode in ("add", "scale"):
            # perturb: inner == 1 and inner > 1 (F = 64: D = 4 groups of 16 features)
            for inner in (1, 4):
                call(f"{dt} {mode} inner={inner}", perturb.perturb_forward,
                     rand(64, 64, dtype=dt), labels, rand(2, 4, dtype=dt), inner, mode)
            for need_grad_h in (False, True):
                # 2 classes, 64 x 64 rows each (more than one tile): chunked (SPLIT) reduction;
                # 16 classes of one sample each: direct
                call(f"{dt} {mode} grad_h={need_grad_h} split", perturb.perturb_backward,
                     rand(64, 256, dtype=dt), rand(64, 256, dtype=dt), labels, rand(2, 4, dtype=dt),
                     2, 4, 1, mode, need_grad_h, True, acc)
                call(f"{dt} {mode} grad_h={need_grad_h} direct", perturb.perturb_backward,
                     rand(16, 16, dtype=dt), rand(16, 16, dtype=dt), torch.arange(16), rand(16, 16, dtype=dt),
                     16, 16, 1, mode, need_grad_h, True, acc)
            for norm in ("linf", "l2"):
                step = [torch.rand(2, dtype=acc) for _ in range(3)]
                call(f"{dt} {norm}", pgd.pgd_step, rand(2, 40, dtype=dt), rand(2, 40, dtype=dt), *step, norm)
                call(f"{dt} {mode} {norm}", pgd.class_grad_pgd_step, rand(2, 4, dtype=dt), rand(64, 64, dtype=dt),
                     labels, rand(64, 64, dtype=dt), *step, 1, mode, norm)
                for bias, direction in ((True, step[2]), (False, None)):
                    call(f"{dt} {mode} {norm} bias={bias} confidence={direction is None}", head_pgd.head_pgd,
                         rand(8, 24, dtype=dt), labels[:8], rand(2, 24, dtype=dt), rand(2, dtype=dt) if bias else None,
                         rand(2, 24, dtype=dt), 1, step[0], step[1], direction, norm, mode)
            for activation in ("none", "relu", "gelu", "gelu_tanh", "silu"):
                name = f"{dt} {mode} {activation}"
                # (B, T, IN) = (8, 3, 40) -> N = 24; with and without bias and saved pre-activation. The
                # GEMM compiles slowly: every activation and mode in float32, one of each elsewhere (the
                # epilogue's dtype handling is the same for every activation and mode).
                if dt == "float32" or (activation, mode) == ("gelu", "scale"):
                    call(name, linear.linear_perturb_forward, rand(24, 40, dtype=dt), rand(24, 40, dtype=dt),
                         rand(24, dtype=dt), labels[:8], 3, rand(2, 24, dtype=dt), activation, mode, True)
                if activation == "gelu" and (dt == "float32" or mode == "scale"):
                    call(name + " no-bias no-preact", linear.linear_perturb_forward, rand(24, 40, dtype=dt),
                         rand(24, 40, dtype=dt), None, labels[:8], 3, rand(2, 24, dtype=dt), activation, mode, False)
                preact = rand(0, dtype=dt) if activation == "none" and mode == "add" else rand(24, 24, dtype=dt)
                call(name, linear.linear_perturb_backward_epilogue, rand(24, 24, dtype=dt), preact, labels[:8], 3,
                     rand(2, 24, dtype=dt), activation, mode)
        if dt == "float32":  # TF32 GEMM operands when torch allows them
            torch.backends.cuda.matmul.allow_tf32 = True
            call(f"{dt} add gelu tf32", linear.linear_perturb_forward, rand(24, 40, dtype=dt), rand(24, 40, dtype=dt),
                 rand(24, dtype=dt), labels[:8], 3, rand(2, 24, dtype=dt), "gelu", "add", True)
            torch.backends.cuda.matmul.allow_tf32 = False
    return launches


def _launched_kernels() -> list[str]:
    """Names of the kernels the modules define to be launched (JIT functions that read a program id)."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            if isinstance(obj, JITFunction) and obj.__module__ == module_name and "program_id" in obj.src:
                names.append(f"{module_name.split('.')[1]}.{obj.__name__}")
    return names


def _compile_everything(archs) -> dict:
    """Compile every distinct recorded specialisation for each arch; the JSON summary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    launches = _record_launches()
    summary = {"triton": triton.__version__, "expected": _launched_kernels(), "recorded": [], "compiled": [],
               "failed": []}
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binders, seen = {}, set()
        for variant, fn, args, kwargs, configs in launches:
            name = f"{fn.fn.__module__.split('.')[1]}.{fn.__name__}"
            if arch == archs[0]:
                summary["recorded"].append([name, variant])
            if arch != archs[0] and not variant.startswith(OTHER_ARCH_DTYPE):
                continue
            if configs and not (arch == archs[0] and variant == EVERY_CONFIG_VARIANT):
                configs = configs[-1:]
            for config in configs or [None]:
                options = {"debug": False, **kwargs, **(config.all_kwargs() if config else {})}
                if fn not in binders:
                    binders[fn] = jit.create_function_from_signature(fn.signature, fn.params, backend)
                bound, specialization, opts = binders[fn](*args, **options)
                opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, opts)
                key = (name, repr(signature), repr(constexprs), repr(attrs), repr(sorted(vars(opts).items())))
                if key in seen:
                    continue
                seen.add(key)
                entry = {"kernel": name, "arch": arch, "variant": variant,
                         "signature": ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"),
                         "constexprs": {fn.params[k[0]].name if len(k) == 1 else str(k): repr(v)
                                        for k, v in constexprs.items()},
                         "num_warps": opts.num_warps, "num_stages": opts.num_stages}
                start = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                              options=vars(opts))
                except Exception as error:  # noqa: BLE001
                    cause = f"\ncaused by {error.__cause__!r}" if error.__cause__ else ""
                    entry["error"] = f"{type(error).__name__}: {error}"[-3000:] + cause[:3000]
                    summary["failed"].append(entry)
                    continue
                entry["seconds"] = round(time.perf_counter() - start, 2)
                entry["cubin_bytes"] = len(compiled.asm["cubin"])
                metadata = compiled.metadata
                entry["shared"] = getattr(metadata, "shared", None)
                # Registers and spills come from the driver when the cubin is loaded; absent without a GPU.
                entry["n_regs"] = getattr(compiled, "n_regs", None)
                entry["n_spills"] = getattr(compiled, "n_spills", None)
                summary["compiled"].append(entry)
    return summary


def _main() -> None:
    archs = [int(a) for a in sys.argv[1:]] or list(ARCHS)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)

    try:  # is the CUDA compiler (and its bundled ptxas) usable here at all?
        triton.compile(ASTSource(fn=probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                 constexprs={"BLOCK": 32}), target=GPUTarget("cuda", archs[0], 32))
    except Exception as error:  # noqa: BLE001
        print(json.dumps({"unavailable": f"{type(error).__name__}: {error}"[:2000]}))
        return
    print(json.dumps(_compile_everything(archs)))


if __name__ == "__main__":
    _main()


# --------------------------------------------------------------------------------------------------
# Test side.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summary():
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "LPA_POISON": "0",
               "CUDA_VISIBLE_DEVICES": ""}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "tests.test_triton_gpu_compile", *map(str, ARCHS)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"compile subprocess failed:\n{result.stderr[-6000:]}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    if "unavailable" in data:
        pytest.skip(f"Triton's CUDA compiler is unavailable here: {data['unavailable']}")
    print(f"\ntriton {data['triton']}: {len(data['compiled'])} compiles in {seconds:.1f} s")
    for entry in data["compiled"]:
        print(f"  sm_{entry['arch']} {entry['kernel']} [{entry['variant']}] {entry['constexprs']} "
              f"warps={entry['num_warps']} stages={entry['num_stages']} shared={entry['shared']} B "
              f"regs={entry['n_regs']} spills={entry['n_spills']} ({entry['seconds']} s)")
    return data


def test_every_kernel_is_launched_for_every_dtype(summary):
    """The capture is complete: each launchable kernel was recorded with inputs of every dtype."""
    recorded = {(name, variant.split()[0]) for name, variant in summary["recorded"]}
    missing = [(name, dt) for name in summary["expected"] for dt in DTYPES if (name, dt) not in recorded]
    assert summary["expected"], "no Triton kernels found in the kernel modules"
    assert not missing, f"kernels never launched by the capture (kernel, dtype): {missing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles_for_cuda(summary, arch):
    """Each distinct recorded specialisation compiles to a cubin for sm_<arch>."""
    failed = [e for e in summary["failed"] if e["arch"] == arch]
    compiled = {e["kernel"] for e in summary["compiled"] if e["arch"] == arch}
    report = "\n\n".join(f"{e['kernel']} [{e['variant']}] {e['signature']} {e['constexprs']} "
                         f"warps={e['num_warps']} stages={e['num_stages']}:\n{e['error']}" for e in failed)
    assert not failed, f"triton {summary['triton']}: {len(failed)} kernel(s) failed to compile for sm_{arch}:\n{report}"
    assert compiled == set(summary["expected"]), f"kernels not compiled for sm_{arch}: {set(summary['expected']) - compiled}"
