"""Loader for the CUDA C++ extension (``lpa_kernels._lpa_cuda``), built from ``csrc/``.

The extension takes raw device pointers, sizes and the stream, so it does not link against torch's
C++ ABI. It imports on a machine without a GPU; calling it there is refused by ``backend.resolve``.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _load():
    """(module, error message); exactly one of them is None."""
    try:
        from lpa_kernels import _lpa_cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the CUDA C++ extension is not built ({exc}); reinstall with LPA_BUILD_CUDA=1"
    return _lpa_cuda, None


def is_built() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    module, error = _load()
    if module is None:
        return error
    if not torch.cuda.is_available():
        return "the CUDA C++ extension is built but this machine has no CUDA GPU"
    return ""


def module():
    """The extension module; only called after ``backend.resolve`` returned ``"cuda"``."""
    mod, error = _load()
    if mod is None:
        raise ValueError(error)
    return mod
