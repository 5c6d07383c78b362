"""linear_perturb's CUTLASS GEMMs against the float64 reference: the sm_90a TMA + WGMMA kernel
(``csrc/linear_perturb_sm90.cu``, ``LPA_CUDA_LINEAR_GEMM=cutlass`` on an H100/H200) and the cp.async +
mma.sync kernel (``csrc/linear_perturb_sm80.cu``, ``LPA_CUDA_LINEAR_GEMM=cutlass_sm80``, on sm_8x and
sm_90): every dtype x activation x mode, the preact the backward reads, ragged tiles in M, N and K (no
size a multiple of the 128 x 128 x 64 tiles), paired and single stores, more tiles than the GPU runs at
once, the fallback to the wmma kernel where 16-byte loads cannot read the operands, and autograd
through the op. A profiler check makes sure the CUTLASS kernel is what ran. GPU only (``pytest -m
gpu``); a GEMM is skipped on GPUs it has no code for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lpa_kernels import linear_perturb
from lpa_kernels.linear_perturb import cuda_kernels, naive
from tests.helpers import assert_close_to_reference, make_labels

DEVICE = "cuda"
pytestmark = pytest.mark.gpu
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# LPA_CUDA_LINEAR_GEMM value -> (the mainloop's name in the kernel's name, the GPUs it runs on).
GEMMS = {
    "cutlass": ("MainloopSm90TmaGmmaWarpSpecialized", lambda cc: cc == (9, 0)),
    "cutlass_sm80": ("MainloopSm80CpAsync", lambda cc: cc[0] == 8 or cc == (9, 0)),
}


@pytest.fixture(autouse=True, params=list(GEMMS))
def gemm(request, monkeypatch):
    """Runs each test once per CUTLASS GEMM, on the GPUs it has code for."""
    if not torch.cuda.is_available() or not GEMMS[request.param][1](torch.cuda.get_device_capability()):
        pytest.skip(f"LPA_CUDA_LINEAR_GEMM={request.param}: no code for this GPU")
    monkeypatch.setenv("LPA_CUDA_LINEAR_GEMM", request.param)
    return request.param


def make_case(dtype, batch, rows_per_label, in_features, out_features, classes=5, bias=True):
    """2-D ``(x (batch * rows_per_label, in), weight, bias, labels, delta)`` on the GPU in ``dtype``."""
    x = torch.randn(batch * rows_per_label, in_features, device=DEVICE).to(dtype)
    weight = (torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, device=DEVICE).to(dtype) if bias else None
    delta = (0.5 * torch.randn(classes, out_features, device=DEVICE)).to(dtype)
    return x, weight, b, make_labels(batch, classes, DEVICE), delta


def check_forward(dtype, batch, rows_per_label, in_features, out_features, activation, mode, bias=True):
    """The launcher's out and preact against the float64 reference (lowp: the eager chain in dtype)."""
    x, weight, b, labels, delta = make_case(dtype, batch, rows_per_label, in_features, out_features, bias=bias)
    out, preact = cuda_kernels.linear_perturb_forward(x, weight, b, labels, rows_per_label, delta, activation, mode, True)
    x64, w64, b64, d64 = (None if t is None else t.double() for t in (x, weight, b, delta))
    rows = labels.repeat_interleave(rows_per_label, output_size=x.shape[0])
    ref = naive.linear_perturb(x64, w64, b64, rows, d64, activation, mode)
    z_lowp = F.linear(x, weight, b)
    a_lowp = naive.ACTIVATION_FNS[activation](z_lowp)
    lowp = a_lowp + delta[rows] if mode == "add" else a_lowp * (1 + delta[rows])
    what = f"{dtype} {activation} {mode} M={x.shape[0]} N={out_features} K={in_features}"
    assert_close_to_reference(out, ref, lowp, what=f"out ({what})")
    assert_close_to_reference(preact, F.linear(x64, w64, b64), z_lowp, what=f"preact ({what})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_every_activation_and_mode_with_ragged_tiles(dtype, activation, mode):
    """M = 3 * 67 = 201, N = 202 (even: paired stores), K = 72: one full and one ragged tile in M and N,
    a ragged K step."""
    check_forward(dtype, 3, 67, 72, 202, activation, mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_more_tiles_than_run_at_once_odd_width_and_no_bias(dtype):
    """17 x 17 = 289 output tiles: more than 132 SMs x 2 consumer warpgroups (sm_90a: the persistent
    warpgroups take several tiles each) or one wave of CTAs; N = 2063 is odd, so every cell goes through
    the one-element stores."""
    check_forward(dtype, 2053, 1, 264, 2063, "gelu", "scale", bias=False)


def test_the_chosen_cutlass_kernel_is_what_runs(gemm):
    x, weight, b, labels, delta = make_case(torch.bfloat16, 4, 3, 64, 40)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_kernels.linear_perturb_forward(x, weight, b, labels, 3, delta, "relu", "add", False)
        torch.cuda.synchronize()
    names = {event.name for event in prof.events()}
    assert any(GEMMS[gemm][0] in name for name in names), f"no {GEMMS[gemm][0]} kernel among {names}"
    assert not any("linear_wmma_kernel" in name for name in names), names


def test_operands_16_byte_loads_cannot_read_fall_back_to_wmma():
    """in_features = 45 (rows not 16-byte aligned): the wmma kernel runs, with the same results."""
    check_forward(torch.float16, 3, 7, 45, 33, "silu", "add")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autograd_through_the_op(dtype):
    """(B, T, in) input through linear_perturb: a CUTLASS forward with the shared backward."""
    x = torch.randn(3, 29, 40, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(50, 40, device=DEVICE) / 40**0.5).to(dtype).requires_grad_()
    b = torch.randn(50, device=DEVICE).to(dtype).requires_grad_()
    delta = (0.1 * torch.randn(4, 50, device=DEVICE)).to(dtype).requires_grad_()
    labels = make_labels(3, 4, DEVICE)
    out = linear_perturb(x, weight, b, labels, delta, "gelu_tanh", "scale", backend="cuda")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, b, delta), grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, b, delta)]
    ref = naive.linear_perturb(leaves64[0], leaves64[1], leaves64[2], labels, leaves64[3], "gelu_tanh", "scale")
    ref_grads = torch.autograd.grad(ref, leaves64, grad.double())
    lowp = naive.linear_perturb(x, weight, b, labels, delta, "gelu_tanh", "scale")
    lowp_grads = torch.autograd.grad(lowp, (x, weight, b, delta), grad)
    assert_close_to_reference(out, ref, lowp, what="out")
    for name, g, r, lg in zip(("x", "weight", "bias", "delta"), grads, ref_grads, lowp_grads):
        assert_close_to_reference(g, r, lg, what=f"grad_{name}")
