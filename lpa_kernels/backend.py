"""Backend selection, in one place.

Every public op calls :func:`resolve` with the ``backend`` argument it was given and the tensors it
works on; the answer is one of ``"reference"``, ``"triton"`` or ``"cuda"``, or a ``ValueError`` that
says why the asked-for backend cannot run here. ``LPA_BACKEND`` overrides ``"auto"`` only. Which
launchers then run is each op's own business (``<op>/backends.py``); this module only adds
:func:`serialised`, the lock that Triton's CPU interpreter needs around them.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from lpa_kernels._checks import check_choice

BACKENDS = ("reference", "triton", "cuda")


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _computed_once(function):
    """Memoise a function of no arguments. Not ``functools.lru_cache``: these run inside ops that
    ``torch.compile`` traces, and Dynamo warns at every lru_cache-wrapped call it meets. ``cache_clear``
    forgets the value (tests that change triton's version)."""
    value = []

    @functools.wraps(function)
    def once():
        if not value:
            value.append(function())
        return value[0]

    once.cache_clear = value.clear
    return once


@_computed_once
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable: {exc}"
    return ""


# The versions pyproject.toml asks for, checked again at first use because pip cannot tell which one a
# machine needs (another package may also have swapped triton since). Compiled kernels (GPU): 3.6, the
# oldest release they are compiled and tested with. The CPU interpreter of triton 3.6 cannot run a loop
# whose bounds are loaded from memory (the per-class reductions do that): 3.9, the interpreter the tests use.
MIN_COMPILED_VERSION = (3, 6)
MIN_INTERPRETER_VERSION = (3, 9)


def _too_old(minimum: tuple[int, int], use: str, why: str) -> str:
    """Why the installed triton is older than ``minimum`` for ``use`` ("" when it is not)."""
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < minimum:
        wanted = ".".join(map(str, minimum))
        return f"triton {triton.__version__} is too old {use} ({why}); install triton>={wanted}"
    return ""


@_computed_once
def _old_interpreter_reason() -> str:
    return _too_old(MIN_INTERPRETER_VERSION, "for TRITON_INTERPRET=1",
                    "its CPU interpreter cannot run the loops with loaded bounds these kernels use")


@_computed_once
def _old_compiler_reason() -> str:
    return _too_old(MIN_COMPILED_VERSION, "for the GPU kernels", "they are compiled and tested with 3.6 and later")


def _triton_reason(device: torch.device | None) -> str:
    """Why Triton cannot run on ``device`` ("" when it can)."""
    reason = _triton_import_error()
    if reason:
        return reason
    if device is None:
        if torch.cuda.is_available():
            return _old_compiler_reason()
        return _old_interpreter_reason() if interpreting() else "no CUDA GPU and TRITON_INTERPRET is not 1"
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 to run Triton kernels"
        return _old_interpreter_reason()
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only; unset it for CUDA tensors"
        return _old_compiler_reason()
    return f"Triton kernels do not run on device type {device.type!r}"


def _cuda_reason(device: torch.device | None) -> str:
    """Why the CUDA C++ extension cannot run on ``device`` ("" when it can)."""
    from lpa_kernels import _cuda_ext

    reason = _cuda_ext.unavailable_reason()
    if reason:
        return reason
    if device is not None and device.type != "cuda":
        return f"the CUDA C++ kernels need CUDA tensors, got a {device.type} tensor"
    return ""


def _reason(backend: str, device: torch.device | None) -> str:
    if backend == "reference":
        return ""
    if backend == "triton":
        return _triton_reason(device)
    return _cuda_reason(device)


def _check_name(backend: object, argname: str = "backend") -> str:
    return check_choice(argname, backend, ("auto",) + BACKENDS)


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend that runs an op on ``device`` for the requested ``backend``."""
    backend = _check_name(backend)
    if backend == "auto":
        env = os.environ.get("LPA_BACKEND", "").strip()
        if env and env != "auto":
            backend = _check_name(env, "LPA_BACKEND")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        for candidate in ("triton", "cuda"):
            if not _reason(candidate, device):
                return candidate
        return "reference"
    reason = _reason(backend, device)
    if reason:
        raise ValueError(f"backend={backend!r} is not available for a {device.type} tensor: {reason}")
    return backend


def backend_info() -> dict:
    """What each backend can do on this machine, and the versions in use."""
    from lpa_kernels import _cuda_ext, _host_ext

    device = torch.device("cuda") if torch.cuda.is_available() else None
    info: dict = {}
    for name in BACKENDS:
        reason = _reason(name, device)
        info[name] = {"available": not reason, "reason": reason}
    host_reason = _host_ext.unavailable_reason()  # the reference backend's C++ kernels for CPU tensors
    info["reference"].update(host_kernels=not host_reason, host_kernels_reason=host_reason)
    info["cuda_extension_built"] = _cuda_ext.is_built()
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    info["cuda_linear_gemm"] = linear_cuda.gemm_info()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - depends on the machine
        triton_version = None
    info["versions"] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "lpa_kernels": _package_version(),
    }
    info["triton_interpreter"] = interpreting()
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def _package_version() -> str:
    from lpa_kernels import __version__

    return __version__


# Triton's CPU interpreter is not thread-safe: while it runs a kernel it patches triton.language module-wide,
# so two threads interpreting at once break each other (InterpreterError). Under TRITON_INTERPRET=1 every
# launcher an op obtains (``<op>/backends.py``) therefore holds this lock while it runs: launches from several threads
# are serialised (correct, one at a time). Compiled GPU launches take no lock. Re-entrant, because a
# launcher may call another (head_pgd's loop calls the perturb and pgd launchers).
INTERPRETER_LOCK = threading.RLock()


class _Serialised:
    """A launcher module whose functions run holding ``INTERPRETER_LOCK``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        launcher = getattr(self._module, name)
        if not callable(launcher):
            return launcher

        @functools.wraps(launcher)
        def locked(*args, **kwargs):
            with INTERPRETER_LOCK:
                return launcher(*args, **kwargs)

        return locked


def serialised(launchers):
    """``launchers`` (an op's launcher module) as the op calls them: under the CPU interpreter each runs
    holding ``INTERPRETER_LOCK``; otherwise the module itself."""
    return _Serialised(launchers) if interpreting() else launchers
