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
                 "linear_forward", "linear_forward_sm90", "linear_forward_sm80", "linear_sm90_missing",
                 "linear_sm80_missing", "linear_epilogue", "linear_backward_epilogue", "class_space_steps"):
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
    monkeypatch.setenv("LPA_CUTLASS_INCLUDE", str(tmp_path / "no-cutlass"))  # and so do the CUTLASS stubs
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
@pytest.mark.parametrize(("source", "arch", "headers", "reason", "targets"), [
    ("linear_perturb_sm90.cu", "80", "4.2", 2, []),              # no sm_90 target: nothing to run wgmma on
    ("linear_perturb_sm90.cu", "90", None, 1, []),               # LPA_CUTLASS_INCLUDE without headers
    ("linear_perturb_sm90.cu", "90a", "4.1", 4, []),             # headers of another CUTLASS version
    ("linear_perturb_sm90.cu", "80;90", "4.2", 0, ["sm_90a"]),   # built, for sm_90a alone
    ("linear_perturb_sm80.cu", "75", "4.2", 2, []),              # no sm_8x or sm_90 target
    ("linear_perturb_sm80.cu", "90a", "4.2", 0, ["sm_90"]),      # an sm_90 cubin runs on sm_90a GPUs
    ("linear_perturb_sm80.cu", "86", "4.2", 0, ["sm_80"]),       # sm_80 SASS runs on sm_86
    ("linear_perturb_sm80.cu", "", "4.2", 0, ["sm_80", "sm_90"]),  # default archs: Hopper can test it too
])
def test_cutlass_gemms_are_built_only_with_cutlass_4_2_and_their_archs(monkeypatch, tmp_path, source, arch, headers,
                                                                       reason, targets):
    monkeypatch.setenv("LPA_CUDA_ARCH", arch)
    include = _fake_cutlass(tmp_path, headers.split(".")[1]) if headers else tmp_path
    monkeypatch.setenv("LPA_CUTLASS_INCLUDE", str(include))
    flags, missing = _cuda_build.cutlass_gemm_flags(_cuda_build.find_nvcc(), source)
    assert missing == reason, f"{source} {arch=} {headers=}: reason {missing} ({_cuda_build.CUTLASS_GEMM_REASONS.get(missing)})"
    gencode = [f.split("code=")[-1] for f in flags if f.startswith("-gencode")]
    assert gencode == targets, f"{source} {arch=}: {flags}"
    if reason == 0:
        assert f"-I{include}" in flags and "-DLPA_WITH_CUTLASS" in flags
    else:
        assert flags == [] and _cuda_build.CUTLASS_GEMM_REASONS[reason]


@pytest.mark.skipif(not _cuda_ext.is_built(), reason="extension not built")
def test_backend_info_says_whether_the_cutlass_gemm_is_built_and_why_not(monkeypatch):
    monkeypatch.delenv("LPA_CUDA_LINEAR_GEMM", raising=False)
    info = backend_info()["cuda_linear_gemm"]
    for name in ("sm90", "sm80"):
        missing = getattr(_cuda_ext.module(), f"linear_{name}_missing")()
        assert info[f"cutlass_{name}"] == {"built": missing == 0,
                                           "reason": "" if missing == 0 else _cuda_build.CUTLASS_GEMM_REASONS[missing]}
    assert info["selected"] == "wmma"


def test_linear_gemm_switch_is_checked(monkeypatch):
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    monkeypatch.setenv("LPA_CUDA_LINEAR_GEMM", "cublas")
    with pytest.raises(ValueError, match="LPA_CUDA_LINEAR_GEMM must be one of"):
        linear_cuda.chosen_gemm()


@pytest.mark.parametrize(("choice", "capability", "in_features", "expected"), [
    ("wmma", (9, 0), 64, "linear_forward"),
    ("cutlass", (9, 0), 64, "linear_forward_sm90"),
    ("cutlass", (8, 6), 64, "linear_forward_sm80"),
    ("cutlass", (10, 0), 64, "linear_forward"),           # no CUTLASS code for it: wmma (its PTX)
    ("cutlass_sm80", (9, 0), 64, "linear_forward_sm80"),
    ("cutlass", (9, 0), 45, "linear_forward"),            # rows not 16-byte aligned
    ("cutlass", (9, 0), 0, "linear_forward"),             # no K step for the CUTLASS mainloop
])
def test_linear_gemm_routing(monkeypatch, choice, capability, in_features, expected):
    """Which extension function runs a 16-bit linear_perturb product (the GPU is faked: only the routing)."""
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    monkeypatch.setenv("LPA_CUDA_LINEAR_GEMM", choice)
    monkeypatch.setattr(linear_cuda.torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(linear_cuda, "cutlass_gemm_missing", lambda name: "")
    x, weight = torch.zeros(5, in_features, dtype=torch.float16), torch.zeros(3, in_features, dtype=torch.float16)
    assert linear_cuda._gemm_launcher(x, weight) == expected


def test_asking_for_a_cutlass_gemm_the_extension_lacks_raises(monkeypatch):
    from lpa_kernels.linear_perturb import cuda_kernels as linear_cuda

    monkeypatch.setenv("LPA_CUDA_LINEAR_GEMM", "cutlass")
    monkeypatch.setattr(linear_cuda.torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(linear_cuda, "cutlass_gemm_missing", lambda name: _cuda_build.CUTLASS_GEMM_REASONS[1])
    x = torch.zeros(5, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="no CUTLASS sm90 GEMM in the extension: the CUTLASS headers were not found"):
        linear_cuda._gemm_launcher(x, x)
