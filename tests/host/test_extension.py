"""The host C++ extension as CI sees it: built by ``pip install`` unless ``LPA_BUILD_HOST=0``, reported
by ``backend_info()``, switched off by ``LPA_HOST_KERNELS=0``, and used only where it serves the tensors."""

from __future__ import annotations

import os

import pytest
import torch

import lpa_kernels
from lpa_kernels import _host_ext, backend_info


@pytest.mark.skipif(os.environ.get("LPA_BUILD_HOST", "").strip() == "0", reason="LPA_BUILD_HOST=0 skips the build")
def test_extension_is_built():
    """A host source that stops compiling fails here (the install only warns)."""
    assert _host_ext.is_built(), _host_ext.unavailable_reason()
    assert backend_info()["reference"]["host_kernels"] is True
    assert backend_info()["reference"]["host_kernels_reason"] == ""


def test_backend_info_says_why_the_host_kernels_are_off(monkeypatch):
    monkeypatch.setenv("LPA_HOST_KERNELS", "0")
    info = backend_info()["reference"]
    assert info["host_kernels"] is False and "LPA_HOST_KERNELS=0" in info["host_kernels_reason"]
    assert info["available"] is True


@pytest.mark.parametrize("value, off", [("0", True), (" 0\n", True), ("1", False), ("", False), ("00", False), (None, False)])
def test_the_switch_is_read_at_each_call(monkeypatch, value, off):
    """The launchers read LPA_HOST_KERNELS through the extension's getenv, set or cleared in-process as
    os.environ sees it (whitespace stripped), and agree with backend_info's reason."""
    if not _host_ext.is_built():
        pytest.skip("the host extension is not built")
    if value is None:
        monkeypatch.delenv("LPA_HOST_KERNELS", raising=False)
    else:
        monkeypatch.setenv("LPA_HOST_KERNELS", value)
    assert _host_ext.may_run() is not off
    assert ("LPA_HOST_KERNELS=0" in _host_ext.unavailable_reason()) is off
    monkeypatch.delenv("LPA_HOST_KERNELS", raising=False)
    assert _host_ext.may_run() is True, "cleared in-process: the kernels serve again"


def _pgd_args(dtype=torch.float32, k=3, n=5):
    delta, grad = torch.zeros(k, n, dtype=dtype), torch.randn(k, n, dtype=dtype)
    hyper = [torch.full((k,), v, dtype=dtype) for v in (0.1, 1.0, 1.0)]
    return delta, grad, hyper


@pytest.mark.parametrize("case", ["float16", "mixed dtypes", "non-contiguous delta", "disabled", "compiling"])
def test_launchers_decline_what_they_do_not_serve(case, monkeypatch):
    """False and delta untouched: the caller runs its PyTorch ops."""
    delta, grad, hyper = _pgd_args()
    if case == "float16":
        delta, grad, hyper = _pgd_args(torch.float16)
    elif case == "mixed dtypes":
        grad = grad.double()
    elif case == "non-contiguous delta":
        delta = torch.zeros(5, 3).t()
    elif case == "disabled":
        monkeypatch.setenv("LPA_HOST_KERNELS", "0")
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    before = delta.clone()
    assert _host_ext.pgd_step(delta, grad, *hyper, "l2") is False
    assert torch.equal(delta, before)


@pytest.mark.parametrize("case", ["float64 h", "int16 labels", "non-contiguous weight"])
def test_head_pgd_launcher_declines_what_it_does_not_serve(case):
    h, y, w = torch.randn(6, 5), torch.tensor([0, 1, 2, 1, 0, 2]), torch.randn(3, 5)
    delta, hyper = torch.zeros(3, 5), [torch.full((3,), v) for v in (0.1, 1.0, 1.0)]
    if case == "float64 h":
        h = h.double()
    elif case == "int16 labels":
        y = y.to(torch.int16)
    else:
        w = torch.randn(5, 3).t()
    assert _host_ext.head_pgd(h, y, w, None, delta, 2, *hyper, "l2", "add", False) is None
    assert torch.equal(delta, torch.zeros(3, 5))


@pytest.mark.gpu
def test_cuda_tensors_never_reach_the_host_kernels(monkeypatch):
    """The reference backend on CUDA tensors keeps its PyTorch ops (no pointer of device memory on the host)."""
    monkeypatch.setattr(_host_ext, "_load", lambda: pytest.fail("the host kernels were asked to run"))
    delta, grad = torch.zeros(3, 5, device="cuda"), torch.randn(3, 5, device="cuda")
    lpa_kernels.pgd_step_(delta, grad, 0.1, 1.0, 1.0, "l2", backend="reference")
    h, y, w = torch.randn(4, 5, device="cuda"), torch.tensor([0, 2, 2, 1], device="cuda"), torch.randn(3, 5, device="cuda")
    lpa_kernels.head_pgd_(h, y, w, None, delta, 2, 0.1, 1.0, "confidence", "l2", "add", backend="reference")


def test_in_place_update_bumps_the_version_counter():
    """Autograd must see the write through the pointer, as it sees an in-place op."""
    delta, grad, hyper = _pgd_args()
    version = delta._version
    assert _host_ext.pgd_step(delta, grad, *hyper, "linf")
    assert delta._version > version


def test_reference_backend_uses_the_host_kernels(reference_path):
    """The public ops on CPU float32 tensors go through the extension, and not with LPA_HOST_KERNELS=0."""
    delta, grad, _ = _pgd_args()
    lpa_kernels.pgd_step_(delta, grad, 0.1, 1.0, 1.0, "l2", backend="reference")
    h, y, w = torch.randn(4, 5), torch.tensor([0, 2, 2, 1]), torch.randn(3, 5)
    lpa_kernels.head_pgd_(h, y, w, None, delta, 2, 0.1, 1.0, "confidence", "l2", "add", backend="reference")
    assert reference_path.calls == ([] if reference_path.name == "torch" else ["pgd_step", "label_range", "head_pgd"])
