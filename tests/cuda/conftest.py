"""The CUDA emulation's fixtures (``emulation/``), shared by the modules that run the CUDA kernels on the CPU:
one build per test session."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from lpa_kernels import _cuda_launch
from lpa_kernels.head_pgd import cuda_kernels as head_pgd_cuda
from lpa_kernels.linear_perturb import cuda_kernels as linear_perturb_cuda
from lpa_kernels.perturb import cuda_kernels as perturb_cuda
from lpa_kernels.pgd import cuda_kernels as pgd_cuda


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """``csrc/`` built against the emulation (``emulation/build.py``) and imported."""
    from tests.cuda.emulation import build

    path = build.build(tmp_path_factory.mktemp("lpa_cuda_emulated"))
    spec = importlib.util.spec_from_file_location("_lpa_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def launchers(emulated, monkeypatch):
    """The ops' CUDA launchers calling the emulated module on CPU tensors (stream 0, a 3-SM device)."""
    monkeypatch.setattr(_cuda_launch, "launch", lambda name, device, *args: getattr(emulated, name)(*args, 0))
    monkeypatch.setattr(_cuda_launch, "_multiprocessors", lambda device: 3)
    modules = (perturb_cuda, pgd_cuda, linear_perturb_cuda, head_pgd_cuda, _cuda_launch)
    return SimpleNamespace(**{name: value for module in modules for name, value in vars(module).items()
                              if callable(value) and not name.startswith("_")})


@pytest.fixture()
def cuda_backend_on_cpu(launchers, monkeypatch):
    """The public ops with backend="cuda" accepting CPU tensors (they then run the emulated kernels)."""
    from lpa_kernels import backend

    monkeypatch.setattr(backend, "_cuda_reason", lambda device: "")
