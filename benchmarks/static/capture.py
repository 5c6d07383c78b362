"""Record the Triton launches the real launchers make, without a GPU, and compile each one for a CUDA
target exactly as ``JITFunction.run`` would on the GPU.

Recording: ``JITFunction.run`` and ``Autotuner.run`` are replaced by a recorder, so a launcher called
with CPU tensors runs its host code (block sizes, grids, specialisation-relevant strides and sizes) and
records ``(variant, kernel, args, kwargs, autotune configs, grid)`` instead of launching. It must run
with ``TRITON_INTERPRET=0`` set before the kernel modules are imported (``triton.jit`` picks the
interpreter at decoration time), hence in a subprocess of the test or report (``compile_worker``).

Compiling: Triton's own binder and ``_pack_args`` turn a recorded launch into the signature,
constexprs, attributes (integer specialisation, pointer alignment) and options for a ``GPUTarget``, and
``triton.compile`` produces PTX and cubin (ptxas included). Resource usage comes from ptxas's ``-v``
log, the instruction facts from the PTX and the cubin's SASS (``machine_code``).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field

from lpa_bench.static import machine_code

H100_SMS = 132


@dataclass
class Launch:
    variant: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    configs: list | None  # autotune configs, None for a plain kernel
    grid: object  # a tuple or a callable of the launch's meta-parameters

    @property
    def name(self) -> str:
        """``<op package>.<kernel>``, e.g. ``perturb._forward_kernel``."""
        return f"{self.fn.fn.__module__.split('.')[1]}.{self.fn.__name__}"

    def grid_size(self, config=None) -> list[int]:
        grid = self.grid
        if callable(grid):
            meta = {**dict(zip(self.fn.arg_names, self.args)), **self.kwargs,
                    **(config.all_kwargs() if config else {})}
            grid = grid(meta)
        return [int(g) for g in grid]


@dataclass
class Recorder:
    launches: list = field(default_factory=list)
    variant: str = ""
    aten_launches: dict = field(default_factory=dict)  # variant -> ATen ops that launch a kernel on a GPU

    def count(self, variant: str, call) -> None:
        """``call()`` under ``variant``, its ATen launches (``counting.LaunchCounter``: the launchers' own
        zero fills, sorts and casts, which a GPU runs as kernels too) added to ``aten_launches``."""
        from lpa_bench.static.counting import LaunchCounter

        self.variant = variant
        counter = LaunchCounter()
        try:
            with counter:
                call()
        finally:
            self.aten_launches[variant] = self.aten_launches.get(variant, 0) + sum(counter.aten.values())

    def call(self, variant: str, launcher, *args, **kwargs):
        """Run a launcher (or a public op) under ``variant``. It may fail once a kernel output it reads
        is garbage (nothing ran), after its launches are recorded, so errors are ignored here and
        missing launches are caught by whoever checks the recording."""
        self.variant = variant
        try:
            launcher(*args, **kwargs)
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def recording(model_h100: bool = True):
    """Replace kernel launches by a recorder for the duration. With ``model_h100``, the launchers'
    device queries (how many programs fill the device, which form ``head_pgd_`` takes) answer as an H100
    would, and the Triton backend accepts CPU tensors, so the public ops record the launches they would
    make on a GPU."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from lpa_kernels import _triton_common, backend
    from lpa_kernels.head_pgd import loop as head_loop
    from lpa_kernels.linear_perturb import triton_kernels as linear

    recorder = Recorder()

    def record_jit(self, *args, grid, warmup, **kwargs):
        recorder.launches.append(Launch(recorder.variant, self, args, kwargs, None, grid))

    def record_autotuned(self, *args, grid, warmup, **kwargs):
        recorder.launches.append(Launch(recorder.variant, self.fn, args, kwargs, list(self.configs), grid))

    saved = [(JITFunction, "run"), (Autotuner, "run")]
    if model_h100:
        saved += [(_triton_common, "parallel_programs"), (backend, "_triton_reason"), (linear, "tma_capable"),
                  (head_loop, "runs_on_gpu")]
    originals = [(owner, name, getattr(owner, name)) for owner, name in saved]
    JITFunction.run, Autotuner.run = record_jit, record_autotuned
    if model_h100:
        _triton_common.parallel_programs = lambda device: 4 * H100_SMS
        backend._triton_reason = lambda device: ""
        linear.tma_capable = lambda device: True
        head_loop.runs_on_gpu = lambda t: True
    try:
        yield recorder
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def launched_kernels(module_names) -> list[str]:
    """Names of the kernels the modules define to be launched: JIT functions that read a program id, and
    those a module lists in ``SINGLE_PROGRAM_KERNELS`` (launched on a grid of one program)."""
    import importlib

    from triton.runtime.jit import JITFunction

    names = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for obj in vars(module).values():
            single = obj in getattr(module, "SINGLE_PROGRAM_KERNELS", ())
            if isinstance(obj, JITFunction) and obj.__module__ == module_name and ("program_id" in obj.src or single):
                names.append(f"{module_name.split('.')[1]}.{obj.__name__}")
    return names


class Compiler:
    """Compiles recorded launches for one CUDA arch, each distinct specialisation once."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders, self.compiled = {}, {}

    def specialise(self, launch: Launch, config):
        """``(key, signature, constexprs, attrs, options)`` as ``JITFunction.run`` computes them."""
        from triton.runtime import jit

        fn = launch.fn
        options = {"debug": False, **launch.kwargs, **(config.all_kwargs() if config else {})}
        if config is not None and config.pre_hook is not None:  # e.g. tensor descriptors' block shapes
            config.pre_hook({**dict(zip(fn.arg_names, launch.args)), **options})
        if fn not in self.binders:
            self.binders[fn] = jit.create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, opts = self.binders[fn](*launch.args, **options)
        opts, signature, constexprs, attrs = fn._pack_args(self.backend, options, bound, specialization, opts)
        key = (launch.name, repr(signature), repr(constexprs), repr(attrs), repr(sorted(vars(opts).items())))
        return key, signature, constexprs, attrs, opts

    def compile(self, launch: Launch, config=None, inspect: bool = False) -> dict:
        """The entry for one launch (and autotune config). A specialisation compiled before is not
        compiled again: its entry is reused (``"reused": True``) with this launch's variant and grid.
        ``inspect`` adds resource usage and the PTX/SASS facts."""
        import triton
        from triton import knobs
        from triton.compiler import ASTSource

        key, signature, constexprs, attrs, opts = self.specialise(launch, config)
        if key in self.compiled:
            return {**self.compiled[key], "variant": launch.variant, "grid": launch.grid_size(config), "reused": True}
        fn = launch.fn
        entry = {"kernel": launch.name, "arch": self.arch, "variant": launch.variant,
                 "signature": ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"),
                 "constexprs": {fn.params[k[0]].name if len(k) == 1 else str(k): repr(v)
                                for k, v in constexprs.items()},
                 "num_warps": opts.num_warps, "num_stages": opts.num_stages,
                 "autotune_config": str(config) if config else None, "grid": launch.grid_size(config)}
        start = time.perf_counter()
        log = io.StringIO()
        try:
            # ptxas runs with -v; this knob prints its log, which holds registers and spill bytes.
            with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
                knobs.nvidia.dump_ptxas_log = inspect
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                          options=vars(opts))
        except Exception as error:  # noqa: BLE001
            cause = f"\ncaused by {error.__cause__!r}" if error.__cause__ else ""
            entry["error"] = f"{type(error).__name__}: {error}"[-3000:] + cause[:3000]
            self.compiled[key] = entry
            return entry
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["cubin_bytes"] = len(compiled.asm["cubin"])
        entry["shared"] = getattr(compiled.metadata, "shared", None)
        if inspect:
            entry.update(machine_code.ptxas_resources(log.getvalue()))
            entry.update(machine_code.ptx_facts(compiled.asm["ptx"]))
            entry.update(machine_code.sass_facts(machine_code.sass_opcodes(machine_code.cubin_sass(compiled.asm["cubin"]))))
        self.compiled[key] = entry
        return entry
