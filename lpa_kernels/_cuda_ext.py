"""Loader for the CUDA C++ extension (``lpa_kernels._lpa_cuda``), built from ``csrc/``.

The extension takes raw device pointers, sizes and the stream, so it does not link against torch's
C++ ABI (its CUDA runtime is linked statically). It imports on a machine without a GPU or driver;
calling it there is refused by ``backend.resolve``.

Where the module comes from, in order:
1. the one ``pip install`` compiled (``setup.py``, when nvcc was found);
2. a just-in-time build on first use, when there is a GPU, nvcc and the ``csrc/`` sources (a source
   checkout or editable install): compiled once by ``_cuda_build`` into
   ``$LPA_CUDA_CACHE`` (default ``~/.cache/lpa_kernels``), in a folder named by a hash of the
   sources, compiler and archs, so a changed source is rebuilt and an unchanged one is reused.
   ``LPA_CUDA_JIT=0`` disables it, ``LPA_CUDA_JIT=1`` allows it without a GPU.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
from pathlib import Path

import torch

from lpa_kernels import _cuda_build

_NAME = "lpa_kernels._lpa_cuda"


def _cache_root() -> Path:
    return Path(os.environ.get("LPA_CUDA_CACHE", Path.home() / ".cache" / "lpa_kernels"))


def _jit_wanted() -> bool:
    flag = os.environ.get("LPA_CUDA_JIT", "")
    return flag == "1" or (flag != "0" and torch.cuda.is_available())


def _jit_build():
    """The JIT-built module (building it when the cache has none), or raises with the reason."""
    nvcc, sources = _cuda_build.find_nvcc(), _cuda_build.csrc_dir()
    if nvcc is None or sources is None:
        missing = "nvcc" if nvcc is None else "the csrc/ sources"
        raise RuntimeError(f"no just-in-time build either: {missing} not found")
    folder = _cache_root() / _cuda_build.build_key(nvcc, sources)
    output = folder / _cuda_build.extension_filename()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as lock:  # one build at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            _cuda_build.build(output, folder / "obj", sources, log=lambda msg: print(msg, flush=True))
    spec = importlib.util.spec_from_file_location(_NAME, output)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _load():
    """(module, error message); exactly one of them is None."""
    try:
        from lpa_kernels import _lpa_cuda  # type: ignore[attr-defined]

        return _lpa_cuda, None
    except ImportError as exc:
        reason = f"the CUDA C++ extension is not built ({exc}); reinstall with LPA_BUILD_CUDA=1 where nvcc is available"
    if not _jit_wanted():
        return None, reason
    try:
        return _jit_build(), None
    except Exception as exc:  # a failed build must not break the other backends
        return None, f"{reason}; the just-in-time build failed: {exc}"


def is_built() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    module, error = _load()
    if module is None:
        return error
    if not torch.cuda.is_available():
        return "the CUDA C++ extension is built but this machine has no CUDA GPU"
    runtime = module.runtime_info()
    if runtime["error"]:
        return (f"the CUDA C++ extension (CUDA runtime {runtime['runtime_version']}) cannot use this GPU driver "
                f"({runtime['driver_version']}): {runtime['error']}")
    return ""


def module():
    """The extension module; only called after ``backend.resolve`` returned ``"cuda"``."""
    mod, error = _load()
    if mod is None:
        raise ValueError(error)
    return mod
