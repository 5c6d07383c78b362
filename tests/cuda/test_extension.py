"""The CUDA C++ extension as CI sees it (no GPU): built whenever nvcc is present, importable without a
driver, and refused with a clear reason when there is no GPU to run it."""

from __future__ import annotations

import importlib
import shutil

import pytest
import torch

import lpa_kernels
from lpa_kernels import _cuda_build, _cuda_ext, backend_info
from lpa_kernels.perturb import cuda_kernels as perturb_cuda

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")


@pytest.mark.skipif(shutil.which("nvcc") is None and _cuda_build.find_nvcc() is None, reason="no nvcc on this machine")
def test_extension_is_built_when_nvcc_is_present():
    """With nvcc, `pip install` must have compiled csrc/: a source that stops compiling fails here."""
    assert _cuda_ext.is_built(), f"lpa_kernels._lpa_cuda is missing although nvcc exists: {_cuda_ext.unavailable_reason()}"
    assert backend_info()["cuda_extension_built"] is True


@pytest.mark.skipif(not _cuda_ext.is_built(), reason="extension not built")
def test_extension_imports_and_reports_its_runtime_without_a_driver():
    module = importlib.import_module("lpa_kernels._lpa_cuda")
    info = module.runtime_info()
    assert info["runtime_version"] >= 11000, f"unexpected CUDA runtime version {info}"
    for name in ("perturb_forward", "perturb_backward", "sum_partials", "pgd_step", "class_grad_pgd_step",
                 "linear_forward", "linear_forward_sm90", "linear_sm90_missing", "linear_epilogue",
                 "linear_backward_epilogue"):
        assert callable(getattr(module, name, None)), f"the extension does not export {name}"
    if not torch.cuda.is_available():
        assert info["device_count"] == 0 and info["error"], f"no GPU here, yet the runtime reports {info}"


@NO_GPU
def test_backend_info_says_why_cuda_is_unavailable():
    cuda = backend_info()["cuda"]
    assert cuda["available"] is False
    expected = "no CUDA GPU" if _cuda_ext.is_built() else "not built"
    assert expected in cuda["reason"], f"reason {cuda['reason']!r} does not say {expected!r}"


@NO_GPU
@pytest.mark.parametrize("op", ["perturb", "class_grad", "pgd_step_", "class_grad_pgd_step_", "linear_perturb"])
def test_cuda_backend_on_cpu_tensors_raises_a_clear_value_error(op):
    h, labels, delta = torch.randn(3, 4), torch.tensor([0, 1, 0]), torch.randn(2, 4)
    calls = {
        "perturb": lambda: lpa_kernels.perturb(h, labels, delta, backend="cuda"),
        "class_grad": lambda: lpa_kernels.class_grad(h, labels, 2, delta.shape, backend="cuda"),
        "pgd_step_": lambda: lpa_kernels.pgd_step_(delta, torch.randn(2, 4), 0.1, 1.0, backend="cuda"),
        "class_grad_pgd_step_": lambda: lpa_kernels.class_grad_pgd_step_(delta, h, labels, 0.1, 1.0, backend="cuda"),
        "linear_perturb": lambda: lpa_kernels.linear_perturb(h, torch.randn(4, 4), None, labels, delta, backend="cuda"),
    }
    with pytest.raises(ValueError, match="backend='cuda' is not available"):
        calls[op]()


def test_launchers_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="need CUDA tensors"):
        perturb_cuda.perturb_forward(torch.randn(3, 4), torch.tensor([0, 1, 0]), torch.randn(2, 4), 1, "add")


@pytest.mark.skipif(_cuda_build.find_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.parametrize(("arch", "expected"), [
    ("", ["code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90a,code=sm_90a", "code=compute_90"]),
    ("90", ["arch=compute_90,code=sm_90", "code=compute_90"]),
    ("sm_80;90a", ["code=sm_80", "arch=compute_90a,code=sm_90a", "arch=compute_80,code=compute_80"]),
])
def test_cuda_arch_switch_selects_the_gencode_flags(monkeypatch, arch, expected):
    monkeypatch.setenv("LPA_CUDA_ARCH", arch)
    flags = " ".join(_cuda_build.gencode_flags(_cuda_build.find_nvcc()))
    for piece in expected:
        assert piece in flags, f"LPA_CUDA_ARCH={arch!r} gave {flags!r}, missing {piece!r}"


def test_build_jobs_are_capped(monkeypatch):
    monkeypatch.delenv("LPA_BUILD_JOBS", raising=False)
    assert 1 <= _cuda_build.parallel_jobs() <= len(_cuda_build.SOURCES)
    monkeypatch.setenv("LPA_BUILD_JOBS", "1")
    assert _cuda_build.parallel_jobs() == 1


@pytest.mark.skipif(_cuda_build.find_nvcc() is None or _cuda_build.find_ninja() is None, reason="needs nvcc and ninja")
def test_jit_build_with_ninja_loads_the_module_and_rebuilds_nothing_when_unchanged(monkeypatch, tmp_path):
    """The just-in-time path: ninja compiles csrc/ into the cache on first use, the module loads, and a
    second build with unchanged sources recompiles no object."""
    monkeypatch.setenv("LPA_CUDA_CACHE", str(tmp_path))
    monkeypatch.setenv("LPA_CUDA_ARCH", "80")  # one arch keeps the test short
    module = _cuda_ext._jit_build()
    assert hasattr(module, "perturb_forward") and module.runtime_info()["runtime_version"] >= 11000
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "obj" / "build.ninja").is_file(), "the JIT build did not go through ninja"
    objects = sorted((folder / "obj").glob("*.o"))
    stamps = [o.stat().st_mtime_ns for o in objects]
    output = folder / _cuda_build.extension_filename()
    _cuda_build.build(output, folder / "obj")
    assert [o.stat().st_mtime_ns for o in objects] == stamps, "ninja recompiled objects whose sources did not change"


def _fake_cutlass(folder, minor):
    (folder / "cutlass").mkdir(parents=True)
    (folder / "cutlass" / "version.h").write_text(f"#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR {minor}\n")
    return folder


@pytest.mark.skipif(_cuda_build.find_nvcc() is None, reason="no nvcc on this machine")
@pytest.mark.parametrize(("arch", "headers", "reason"), [
    ("80", "4.2", 2),     # no sm_90 target: nothing to run wgmma on
    ("90", None, 1),      # LPA_CUTLASS_INCLUDE without headers
    ("90a", "4.1", 4),    # headers of another CUTLASS version
    ("80;90", "4.2", 0),  # built, for sm_90a alone
])
def test_sm90_gemm_is_built_only_with_cutlass_4_2_and_an_sm90_target(monkeypatch, tmp_path, arch, headers, reason):
    monkeypatch.setenv("LPA_CUDA_ARCH", arch)
    include = _fake_cutlass(tmp_path, headers.split(".")[1]) if headers else tmp_path
    monkeypatch.setenv("LPA_CUTLASS_INCLUDE", str(include))
    flags, missing = _cuda_build.sm90_gemm_flags(_cuda_build.find_nvcc())
    assert missing == reason, f"{arch=} {headers=}: reason {missing} ({_cuda_build.SM90_GEMM_REASONS.get(missing)})"
    if reason == 0:
        assert flags[0] == "-gencode=arch=compute_90a,code=sm_90a" and f"-I{include}" in flags
        assert "-DLPA_WITH_CUTLASS" in flags and not any("sm_80" in f for f in flags)
    else:
        assert flags == [] and _cuda_build.SM90_GEMM_REASONS[reason]


@pytest.mark.skipif(not _cuda_ext.is_built(), reason="extension not built")
def test_backend_info_says_whether_the_cutlass_gemm_is_built_and_why_not(monkeypatch):
    monkeypatch.delenv("LPA_CUDA_LINEAR_GEMM", raising=False)
    info = backend_info()["cuda_linear_gemm"]
    missing = _cuda_ext.module().linear_sm90_missing()
    assert info["sm90_cutlass_built"] is (missing == 0)
    assert info["reason"] == ("" if missing == 0 else _cuda_build.SM90_GEMM_REASONS[missing])
    assert info["selected"] == "wmma"


def test_linear_gemm_switch_is_checked(monkeypatch):
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    monkeypatch.setenv("LPA_CUDA_LINEAR_GEMM", "cublas")
    with pytest.raises(ValueError, match="LPA_CUDA_LINEAR_GEMM must be one of"):
        linear_cuda.chosen_gemm()
