"""Packaging: the Python packages, the host C++ extension, and the CUDA C++ extension when nvcc is found
(see csrc/README.md).

``python/`` installs as ``lpa_programs`` (training programs) and ``benchmarks/`` as ``lpa_bench``.

``LPA_BUILD_CUDA=1`` builds the extension ``lpa_kernels._lpa_cuda`` or fails; ``LPA_BUILD_CUDA=0``
skips it; unset, it is built when nvcc is found and a loud warning says so when it is not. The nvcc
build itself (archs: ``LPA_CUDA_ARCH``; parallel jobs: ``LPA_BUILD_JOBS``) is
``lpa_kernels/_cuda_build.py``, shared with the just-in-time build.

``lpa_kernels._lpa_host`` (``csrc/host/``, the reference backend's CPU kernels) is compiled by
setuptools with the host C++ compiler, whatever ``LPA_BUILD_CUDA`` says: ``LPA_BUILD_HOST=0`` skips it,
``LPA_BUILD_HOST=1`` makes a failed build an error; unset, a failure is a loud warning and the reference
backend keeps its PyTorch path.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
packages = find_packages(include=["lpa_kernels", "lpa_kernels.*"]) + ["lpa_programs", "lpa_bench", "lpa_bench.static"]


def _load_cuda_build():
    """``lpa_kernels/_cuda_build.py`` by path: importing the package would need torch, absent here."""
    spec = importlib.util.spec_from_file_location("_lpa_cuda_build", ROOT / "lpa_kernels" / "_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


HOST_EXTENSION = "lpa_kernels._lpa_host"
HOST_SOURCES = ["csrc/host/pgd_step.cpp", "csrc/host/head_pgd.cpp", "csrc/host/step_update.cpp", "csrc/host/perturb.cpp",
                "csrc/host/labels.cpp", "csrc/host/head_loss.cpp",
                "csrc/host/bindings.cpp"]


class BuildExtensions(build_ext):
    """The host extension with setuptools' C++ compiler; the CUDA one with nvcc through ``_cuda_build``."""

    def build_extension(self, ext):
        if ext.name == HOST_EXTENSION:
            self._build_host(ext)
            return
        cuda_build = _load_cuda_build()
        output = Path(self.get_ext_fullpath(ext.name))
        start = time.time()
        cuda_build.build(output, Path(self.build_temp) / "lpa_cuda", ROOT / "csrc")
        print(f"lpa_kernels: CUDA extension built in {time.time() - start:.0f} s: {output}", flush=True)


    def _build_host(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if _host_switch() == "1":
                raise
            _warn(f"the host C++ extension did not build ({exc}): installing lpa_kernels WITHOUT its host kernels "
                  "(the reference backend runs on PyTorch ops, slower on small CPU problems). Set LPA_BUILD_HOST=1 "
                  "to make this an error.")


def _host_switch() -> str:
    return os.environ.get("LPA_BUILD_HOST", "").strip()


def _host_extensions():
    if _host_switch() == "0":
        print("lpa_kernels: LPA_BUILD_HOST=0, not building the host C++ extension", flush=True)
        return []
    try:
        import pybind11
    except ImportError:
        if _host_switch() == "1":
            raise
        _warn("pybind11 not found: installing lpa_kernels WITHOUT its host C++ kernels (the reference backend runs "
              "on PyTorch ops). Install pybind11 and reinstall, or set LPA_BUILD_HOST=1 to make this an error.")
        return []
    # -O3 without -march=native: the wheel runs on any x86-64 / aarch64 machine; single-threaded code.
    # -fno-trapping-math: nothing reads floating-point exception flags, and selects in loops then vectorise
    # (it allows no reassociation: every result stays what the source's order of operations gives).
    return [Extension(HOST_EXTENSION, sources=HOST_SOURCES, depends=["csrc/host/host_kernels.h"],
                      include_dirs=[pybind11.get_include()], language="c++",
                      extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fno-trapping-math"])]


def _cuda_extensions():
    switch = os.environ.get("LPA_BUILD_CUDA", "").strip()
    if switch == "0":
        print("lpa_kernels: LPA_BUILD_CUDA=0, not building the CUDA extension", flush=True)
        return []
    cuda_build = _load_cuda_build()
    if cuda_build.find_nvcc() is None:
        if switch == "1":
            raise RuntimeError("LPA_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        _warn("nvcc not found: installing lpa_kernels WITHOUT its CUDA C++ backend (backend='cuda' will be "
              "unavailable). Install the CUDA toolkit and reinstall, or set LPA_BUILD_CUDA=1 to make this an error.")
        return []
    in_csrc = lambda names: [str(Path("csrc") / name) for name in names]  # noqa: E731
    return [Extension("lpa_kernels._lpa_cuda", sources=in_csrc(cuda_build.SOURCES), depends=in_csrc(cuda_build.HEADERS))]


setup(
    packages=packages,
    package_dir={"lpa_programs": "python", "lpa_bench": "benchmarks", "lpa_bench.static": "benchmarks/static"},
    ext_modules=_host_extensions() + _cuda_extensions(),
    cmdclass={"build_ext": BuildExtensions},
)
