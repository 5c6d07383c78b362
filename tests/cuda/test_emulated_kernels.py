"""The CUDA kernels' own code, run on the CPU: ``csrc/`` compiled by g++ against a host emulation of
CUDA (``emulation/``: blocks one after another, each thread a real thread, __syncthreads a real
barrier, wmma as plain loops) and driven through the real launchers of ``lpa_kernels/<op>/cuda_kernels.py``
on CPU tensors. This checks the indexing, the vector/scalar paths, the class reductions (split
across blocks: the emulated GPU has 3 SMs) and the epilogues against the float64 reference on a
machine without a GPU. It cannot check what only hardware shows (tensor-core numerics, timing,
memory-model races): ``pytest -m gpu`` and benchmarks/sanitize_cuda.py do that on a GPU. The fixtures
(``emulated``, ``launchers``, ``cuda_backend_on_cpu``) are in conftest.py; test_emulated_block_order.py runs
the kernels whose blocks communicate with their blocks out of index order.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import lpa_kernels
from lpa_kernels import _cuda_build, _cuda_launch
from lpa_kernels.head_pgd import loop as head_loop
from lpa_kernels.pgd import cuda_kernels as pgd_cuda
from lpa_kernels._common import delta_layout
from lpa_kernels.linear_perturb import naive as linear_naive
from lpa_kernels.perturb import naive
from lpa_kernels.pgd import naive as pgd_naive
from tests.head_pgd import test_fused_class_space as fused_checks
from tests.head_pgd.test_head_pgd_compact import check_compacted, check_guard
from tests.head_pgd.test_head_pgd import check_against_reference as check_head_pgd
from tests.head_pgd.test_head_pgd import check_float16_class_space_overflow
from tests.head_pgd.test_head_pgd import check_float32_delta_with_float64_data_inside_eps
from tests.head_pgd.test_head_pgd import make_problem as make_head_problem
from tests.pgd.test_pgd import PROJECTION_DTYPES, check_fused_step_inside_eps, check_l2_projection_inside_eps
from tests.pgd.test_pgd import check_rounded_copy
from tests.step_update import test_step_update as step_update_tests
from tests.helpers import DTYPES, assert_close_to_reference, make_labels

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or _cuda_build.find_nvcc() is None,
                                reason="needs g++ and the CUDA toolkit headers")
# Features (3, 8, 9) per sample; per class, a group has more elements than a block has threads, so
# every thread strides through several (sample, run, offset) positions.
FEATURES = (3, 8, 9)
LAYOUTS = {"full": (3, *FEATURES), "channel": (3, 3, 1, 1), "last_dim": (3, 9)}


def _flat(t):
    return t.reshape(t.shape[0], -1)


@pytest.fixture(params=["per_class", "split"])
def pgd_grid(request, monkeypatch):
    """pgd_step's grid: one block per class, or (feature tile, class) blocks (64-entry tiles: the rows
    of 301 entries span 5, the last ragged). Unforced, the 3-SM device picks the split for K < 6."""
    tile = 64 if request.param == "split" else None
    monkeypatch.setattr(pgd_cuda, "split_block", lambda K, D, device: tile)
    return request.param


def _misaligned(shape, dtype):
    numel = torch.Size(shape).numel()
    return torch.randn(numel + 8).to(dtype)[1:numel + 1].view(shape)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_perturb_forward(launchers, dtype, layout, mode, aligned):
    shape = (7, *FEATURES)
    h = torch.randn(shape).to(dtype) if aligned else _misaligned(shape, dtype)
    labels = make_labels(7, 3)
    delta = torch.randn(LAYOUTS[layout]).to(dtype)
    D, inner = delta_layout(shape[1:], delta.shape)
    out = launchers.perturb_forward(_flat(h), labels, _flat(delta), inner, mode).view(shape)
    ref = naive.perturb(h.double(), labels, delta.double(), mode)
    assert_close_to_reference(out, ref, naive.perturb(h, labels, delta, mode), what=f"perturb forward {layout}")


def test_perturb_forward_vector_tail_and_float32_delta_with_half_h(launchers):
    h = torch.randn(5, 13).half()  # 65 elements: 8 vectors of 8 and a tail of 1
    labels, delta = make_labels(5, 2), torch.randn(2, 13)
    out = launchers.perturb_forward(h, labels, delta, 1, "scale")
    assert_close_to_reference(out, naive.perturb(h.double(), labels, delta.double(), "scale"), what="tail")


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("need_grad_h", [True, False])
def test_perturb_backward(launchers, dtype, layout, mode, need_grad_h):
    shape, batch = FEATURES, 40
    h = torch.randn(batch, *shape).to(dtype)
    grad_out = torch.randn(batch, *shape).to(dtype)
    labels = make_labels(batch, 3)
    labels[0] = 2  # class 1 may be absent; class 2 is present
    delta = (0.5 * torch.randn(LAYOUTS[layout])).to(dtype)
    D, inner = delta_layout(shape, delta.shape)
    grad_h, grad_delta = launchers.perturb_backward(
        _flat(grad_out), _flat(h), labels, _flat(delta), 3, D, inner, mode, need_grad_h, dtype)
    h64, d64 = h.double().requires_grad_(), delta.double().requires_grad_()
    ref_h, ref_d = torch.autograd.grad(naive.perturb(h64, labels, d64, mode), (h64, d64), grad_out.double())
    lowp = naive.class_grad(grad_out, labels, 3, delta.shape, h=h, mode=mode, out_dtype=dtype)
    assert_close_to_reference(grad_delta.view(delta.shape), ref_d, lowp, what=f"grad_delta {layout}")
    if need_grad_h:
        lowp_h = (grad_out.float() * (1 + naive.perturb(torch.zeros_like(h), labels, delta, "add").float())).to(dtype) \
            if mode == "scale" else grad_out
        assert_close_to_reference(grad_h.view(h.shape), ref_h, lowp_h, what="grad_h")
    else:
        assert grad_h is None


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_perturb_backward_last_dim_vector_path(launchers, dtype, mode, aligned):
    """Last-dim delta of 16 groups (a multiple of every vector width) over 5 rows per sample."""
    shape = (37, 5, 16)
    grad_out = torch.randn(shape).to(dtype) if aligned else _misaligned(shape, dtype)
    h, labels = torch.randn(shape).to(dtype), make_labels(37, 3)
    delta = torch.randn(3, 16).to(dtype)
    grad_h, grad_delta = launchers.perturb_backward(_flat(grad_out), _flat(h), labels, delta, 3, 16, 1, mode, True, dtype)
    h64, d64 = h.double().requires_grad_(), delta.double().requires_grad_()
    ref_h, ref_d = torch.autograd.grad(naive.perturb(h64, labels, d64, mode), (h64, d64), grad_out.double())
    assert_close_to_reference(grad_delta, ref_d, naive.class_grad(grad_out, labels, 3, (3, 16), h=h, mode=mode, out_dtype=dtype),
                              what="grad_delta")
    assert_close_to_reference(grad_h.view(shape), ref_h, (grad_out.double() * (1 + d64.detach()[labels][:, None])).to(dtype)
                              if mode == "scale" else grad_out, what="grad_h")


def test_perturb_backward_many_samples_split_across_blocks_is_reproducible(launchers):
    grad_out, labels = torch.randn(300, 6), torch.zeros(300, dtype=torch.int64)
    assert launchers.reduce_splits(torch.device("cpu"), 1, 6, 1, 300, 4) > 1, "the emulated device must split here"
    runs = [launchers.perturb_backward(grad_out, None, labels, None, 1, 6, 1, "add", False, torch.float16)[1]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), "two identical class reductions differ"
    assert_close_to_reference(runs[0], grad_out.double().sum(0, keepdim=True), what="single-class grad_delta")


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("grad_dtype", ["same", "float32"])
def test_pgd_step(launchers, pgd_grid, dtype, norm, grad_dtype):
    K, D = 4, 301
    delta = (0.3 * torch.randn(K, D)).to(dtype)
    grad = torch.randn(K, D).to(dtype if grad_dtype == "same" else torch.float32)
    grad[1] = 0  # absent class: keeps its delta
    grad[2, 5] = float("nan")  # NaN propagates
    grad[3, :150] = 0  # a moving class whose first tiles have a zero gradient: their entries are still clamped
    step, eps, direction = torch.rand(K) * 0.2, torch.rand(K) + 0.1, torch.tensor([1.0, -1.0, 1.0, -1.0])
    ref = pgd_naive.pgd_step_(delta.double(), grad.double(), step.double(), eps.double(), direction.double(), norm)
    launchers.pgd_step(delta, grad, step, eps, direction, norm)
    assert_close_to_reference(delta, ref, what=f"delta after pgd_step ({norm})")


@pytest.mark.parametrize("ok", [None, True, False], ids=["plain", "ok", "bad-labels"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_pgd_step_writes_the_new_iterate_rounded_when_asked(launchers, pgd_grid, grad_dtype, norm, ok, monkeypatch):
    """tests/pgd/test_pgd.py's check: on one block per class a float32 iterate takes its 16-bit gradient as it
    is and the kernel writes the rounded copy (its pointer reaches the launch); the split grid takes a
    float32 copy of the gradient and copies the iterate after."""
    launched, launch = [], _cuda_launch.launch

    def spy(name, device, *args):
        launched.append(args[-1])
        launch(name, device, *args)
    monkeypatch.setattr(_cuda_launch, "launch", spy)
    check_rounded_copy(launchers.pgd_step, "cpu", grad_dtype, norm, ok)
    assert [bool(rounded) for rounded in launched] == [False, pgd_grid == "per_class"], "rounded's pointer"


@pytest.mark.parametrize("ok", [True, False], ids=["ok", "bad-labels"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_guarded_pgd_step(launchers, pgd_grid, norm, ok):
    K, D = 5, 301
    delta = 0.3 * torch.randn(K, D)
    grad = torch.randn(K, D)
    grad[1] = 0  # absent class
    grad[2, 5], grad[3, 7] = float("nan"), float("inf")  # the guard keeps these classes
    step, eps, direction = torch.rand(K) * 0.2, torch.rand(K) + 0.1, torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5])
    verdict, ref_skipped = torch.tensor(ok), torch.zeros((), dtype=torch.int64)
    ref = pgd_naive.guarded_pgd_step_(delta.double(), grad.double(), step.double(), eps.double(), direction.double(),
                                      norm, verdict, ref_skipped)
    before, skipped = delta.clone(), torch.full((), 4, dtype=torch.int64)
    launchers.pgd_step(delta, grad, step, eps, direction, norm, verdict, skipped)
    assert int(skipped) == 4 + int(ref_skipped) == 4 + (2 if ok else 0)
    kept = [1, 2, 3] if ok else list(range(K))
    assert torch.equal(delta[kept], before[kept]), "guarded classes must keep their delta bit for bit"
    assert_close_to_reference(delta, ref, what=f"delta after the guarded pgd_step ({norm})")


# (features per sample, delta shape) for the fused kernel: FEATURES' layouts (full D = 216 and channel-wise
# runs of 72 take the 16-byte path when aligned, last-dim D = 9 never) and a last-dim delta of 16 groups
# (a multiple of every vector width) over 5 rows per sample.
CLASS_GRAD_PGD_CASES = {**{layout: (FEATURES, shape) for layout, shape in LAYOUTS.items()}, "last_dim_16": ((5, 16), (3, 16))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CLASS_GRAD_PGD_CASES)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_class_grad_pgd_step(launchers, dtype, case, mode, norm, aligned):
    """41 samples; a misaligned grad_out (add) or h (scale) forces one element per thread (the emulation
    does not trap a misaligned vector load; the next test checks which path ran)."""
    features, delta_shape = CLASS_GRAD_PGD_CASES[case]
    shape = (41, *features)
    grad_out = torch.randn(shape).to(dtype) if aligned or mode == "scale" else _misaligned(shape, dtype)
    h = torch.randn(shape).to(dtype) if aligned or mode == "add" else _misaligned(shape, dtype)
    labels = make_labels(41, 2)  # class 2 absent
    delta = (0.2 * torch.randn(delta_shape)).to(dtype)
    D, inner = delta_layout(features, delta.shape)
    step, eps, direction = torch.tensor([0.05, 0.1, 0.2]), torch.tensor([0.3, 0.2, 0.4]), torch.tensor([1.0, -1.0, 1.0])
    ref = pgd_naive.class_grad_pgd_step_(delta.double(), grad_out.double(), labels, step.double(), eps.double(),
                                         direction.double(), norm, h=h.double(), mode=mode)
    launchers.class_grad_pgd_step(_flat(delta), _flat(grad_out), labels, _flat(h), step, eps, direction, inner, mode, norm)
    assert_close_to_reference(delta, ref, what=f"delta after class_grad_pgd_step ({case}, {mode}, {norm})")


@pytest.mark.parametrize("case", CLASS_GRAD_PGD_CASES)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_class_grad_pgd_step_sums_in_the_class_reductions_order(launchers, monkeypatch, case, mode, aligned):
    """float32, 300 samples (split across blocks): the fused kernel's class gradient (its workspace row)
    equals, bit for bit, the class reduction's (perturb backward). The two paths sum in different orders,
    so this checks that both take the same one (a misaligned grad_out (add) or h (scale): scalar). Its
    update then equals pgd_step on that gradient up to the rounding of the norms (the fused kernel
    combines per-tile partials, as pgd_step's split grid does with other tiles)."""
    features, delta_shape = CLASS_GRAD_PGD_CASES[case]
    shape = (300, *features)
    grad_out = torch.randn(shape) if aligned or mode == "scale" else _misaligned(shape, torch.float32)
    h = torch.randn(shape) if aligned or mode == "add" else _misaligned(shape, torch.float32)
    labels = make_labels(300, 3)
    delta = 0.2 * torch.randn(delta_shape)
    D, inner = delta_layout(features, delta.shape)
    assert launchers.reduce_splits(torch.device("cpu"), 3, D, inner, 300, 4) > 1, "the emulated device must split here"
    step, eps, direction = torch.tensor([0.05, 0.1, 0.2]), torch.tensor([0.3, 0.2, 0.4]), torch.tensor([1.0, -1.0, 1.0])
    workspaces, allocate = [], pgd_cuda.class_grad_workspace

    def recording(K, D, splits, *rest):
        workspaces.append((splits, allocate(K, D, splits, *rest)))
        return workspaces[-1][1]
    monkeypatch.setattr(pgd_cuda, "class_grad_workspace", recording)
    fused = delta.clone()
    launchers.class_grad_pgd_step(_flat(fused), _flat(grad_out), labels, _flat(h), step, eps, direction, inner, mode, "l2")
    grad = launchers.perturb_backward(_flat(grad_out), _flat(h), labels, None, 3, D, inner, mode, False, torch.float32)[1]
    [(splits, (workspace, _))] = workspaces
    assert torch.equal(workspace[splits * 3 * D:(splits + 1) * 3 * D].view(3, D), grad), \
        "the fused class gradient is summed in another order"
    ref = pgd_naive.pgd_step_(_flat(delta).double(), grad.double(), step.double(), eps.double(), direction.double(), "l2")
    assert_close_to_reference(_flat(fused), ref, what="fused l2 step on the class gradient")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("features, per_class", [((2, 600), (600,)), ((40, 7, 7), (40, 1, 1))],
                         ids=["last_dim", "channel"])
def test_prepared_class_grad_pgd_step_repeats_like_fresh_calls(launchers, monkeypatch, splits, norm, features,
                                                              per_class):
    """tests/pgd's check of one preparation launched three times, on the CUDA kernel: its arrival counters
    per (class, tile) (over ``splits`` sample shares) and per class must be back at zero after each launch."""
    from tests.pgd.test_pgd import check_prepared_step_repeats_like_fresh_calls

    monkeypatch.setattr(_cuda_launch, "reduce_splits", lambda *args: splits)
    check_prepared_step_repeats_like_fresh_calls(launchers, features, per_class, norm, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", [32, 13], ids=["vector-loads", "scalar-loads"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_linear_perturb_forward_and_backward_epilogue(launchers, dtype, in_features, activation, mode):
    """M = 2 * 35 rows and N = 67 columns: partial 64 x 64 tiles in both directions."""
    B, T, N, K = 2, 35, 67, 3
    x = torch.randn(B * T, in_features).to(dtype)
    weight = (torch.randn(N, in_features) / in_features**0.5).to(dtype)
    bias, delta = torch.randn(N).to(dtype), (0.3 * torch.randn(K, N)).to(dtype)
    labels = make_labels(B, K)
    out, preact = launchers.linear_perturb_forward(x, weight, bias, labels, T, delta, activation, mode, True)
    inputs = [t.double().requires_grad_() for t in (x, weight, bias, delta)]
    ref = linear_naive.linear_perturb(inputs[0].view(B, T, -1), inputs[1], inputs[2], labels, inputs[3], activation, mode)
    lowp = linear_naive.linear_perturb(x.view(B, T, -1), weight, bias, labels, delta, activation, mode)
    assert_close_to_reference(out.view(B, T, N), ref, lowp, what="linear_perturb forward")
    z = inputs[0].detach() @ inputs[1].detach().T + inputs[2].detach()
    assert_close_to_reference(preact, z, (x.float() @ weight.float().T + bias.float()).to(dtype), what="preact")

    grad_out = torch.randn(B * T, N).to(dtype)
    grad_preact, grad_bias, grad_delta = launchers.linear_perturb_backward_epilogue(
        grad_out, preact, labels, T, delta, activation, mode)
    z64 = preact.double().requires_grad_()  # the saved pre-activation is what the backward reads
    d64 = delta.double().requires_grad_()
    a = linear_naive.ACTIVATION_FNS[activation](z64).view(B, T, N)
    refs = torch.autograd.grad(naive.perturb(a, labels, d64, mode), (z64, d64), grad_out.double().view(B, T, N))
    assert_close_to_reference(grad_preact, refs[0], what="grad_preact")
    assert_close_to_reference(grad_bias, refs[0].sum(0), what="grad_bias")
    assert_close_to_reference(grad_delta, refs[1], what="grad_delta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_linear_backward_epilogue_vector_path(launchers, dtype, activation, mode):
    """N = 64 columns: the backward epilogue reads and writes 16 bytes at a time."""
    B, T, N, K = 5, 3, 64, 2
    preact, grad_out = torch.randn(B * T, N).to(dtype), torch.randn(B * T, N).to(dtype)
    labels, delta = make_labels(B, K), (0.3 * torch.randn(K, N)).to(dtype)
    grad_preact, grad_bias, grad_delta = launchers.linear_perturb_backward_epilogue(
        grad_out, preact, labels, T, delta, activation, mode)
    z64, d64 = preact.double().requires_grad_(), delta.double().requires_grad_()
    a = linear_naive.ACTIVATION_FNS[activation](z64).view(B, T, N)
    refs = torch.autograd.grad(naive.perturb(a, labels, d64, mode), (z64, d64), grad_out.double().view(B, T, N))
    assert_close_to_reference(grad_preact, refs[0], what="grad_preact")
    assert_close_to_reference(grad_bias, refs[0].sum(0), what="grad_bias")
    assert_close_to_reference(grad_delta, refs[1], what="grad_delta")


def test_linear_backward_epilogue_without_preact(launchers):
    """activation "none" in add mode never reads the pre-activation (the forward may not save it)."""
    grad_out, labels, delta = torch.randn(6, 9), torch.tensor([1, 0, 1]), torch.randn(2, 9)
    grad_preact, grad_bias, grad_delta = launchers.linear_perturb_backward_epilogue(
        grad_out, torch.empty(0), labels, 2, delta, "none", "add")
    assert torch.equal(grad_preact, grad_out), "grad_preact must equal grad_out for activation none, add mode"
    assert_close_to_reference(grad_bias, grad_out.double().sum(0), what="grad_bias")
    expected = torch.stack([grad_out[2:4].double().sum(0), grad_out[[0, 1, 4, 5]].double().sum(0)])
    assert_close_to_reference(grad_delta, expected, what="grad_delta")


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_public_ops_through_the_custom_ops(cuda_backend_on_cpu, mode):
    """The op wiring (custom ops, autograd, layouts) calls the CUDA launchers with the right arguments."""
    import lpa_kernels

    h = torch.randn(6, 3, 4, 5, requires_grad=True)
    labels = make_labels(6, 3, dtype=torch.int32)
    delta = (0.2 * torch.randn(3, 3, 1, 1)).requires_grad_()
    out = lpa_kernels.perturb(h, labels, delta, mode, backend="cuda")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (h, delta), grad_out)
    h64, d64 = h.detach().double().requires_grad_(), delta.detach().double().requires_grad_()
    ref = naive.perturb(h64, labels, d64, mode)
    assert_close_to_reference(out, ref, what="perturb")
    for name, g, r in zip(("h", "delta"), grads, torch.autograd.grad(ref, (h64, d64), grad_out.double())):
        assert_close_to_reference(g, r, what=f"perturb grad_{name}")

    x = torch.randn(3, 2, 10, requires_grad=True)
    weight, bias = torch.randn(7, 10, requires_grad=True), torch.randn(7, requires_grad=True)
    ldelta = (0.2 * torch.randn(3, 7)).requires_grad_()
    lout = lpa_kernels.linear_perturb(x, weight, bias, labels[:3], ldelta, "gelu", mode, backend="cuda")
    lgrads = torch.autograd.grad(lout.square().sum(), (x, weight, bias, ldelta))
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias, ldelta)]
    lref = linear_naive.linear_perturb(inputs[0], inputs[1], inputs[2], labels[:3], inputs[3], "gelu", mode)
    assert_close_to_reference(lout, lref, what="linear_perturb")
    for name, g, r in zip(("x", "weight", "bias", "delta"), lgrads, torch.autograd.grad(lref.square().sum(), inputs)):
        assert_close_to_reference(g, r, what=f"linear_perturb grad_{name}")

    step = delta.detach().clone()
    expected = pgd_naive.class_grad_pgd_step_(step.double(), grad_out.double(), labels, *(torch.full((3,), v, dtype=torch.float64) for v in (0.05, 0.3, 1.0)),
                                              "l2", h=h.detach().double(), mode=mode)
    lpa_kernels.class_grad_pgd_step_(step, grad_out, labels, 0.05, 0.3, 1.0, "l2", h=h.detach(), mode=mode, backend="cuda")
    assert_close_to_reference(step, expected, what="class_grad_pgd_step_")


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_head_pgd(cuda_backend_on_cpu, dtype, mode, norm):
    """head_pgd_(backend="cuda") through the custom op: B = 37 samples, K = 11 classes (a full chunk
    of 8 and a ragged one), D = 45 (lanes stride twice), two steps with the confidence rule. Class 10
    is absent: its delta must stay bit-identical."""
    h, y, weight, bias, delta = make_head_problem(37, 11, 45, dtype, labels=make_labels(37, 10))
    actual = check_head_pgd(("cuda", "cpu"), h, y, weight, bias, delta, steps=2, step_size=0.1, eps=0.3,
                            direction="confidence", norm=norm, mode=mode)
    assert torch.equal(actual[10], delta[10]), "the absent class's delta changed"


@pytest.mark.parametrize("direction", [1.0, "confidence"])  # the one-launch class space, and the unfused one
def test_head_pgd_float16_class_sums_stay_finite(cuda_backend_on_cpu, direction):
    check_float16_class_space_overflow(("cuda", "cpu"), direction)


@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32], ids=str)
def test_head_pgd_rows_each_extra_step_launches_only_its_own_kernels(cuda_backend_on_cpu, monkeypatch, labels_dtype):
    """The rows form on the CUDA backend (B = 40, K = 100): T = 3 launches exactly 2 steps' kernels more
    than T = 1, 5 each (perturb_forward, logits GEMM, softmax_xent_grad, GEMM, class_grad_pgd_step): the
    fused update's workspace and counters are prepared once per call, int32 labels converted once."""
    from lpa_bench.static.counting import LaunchCounter

    emulated_launch, kernels = _cuda_launch.launch, []

    def counting(name, device, *args):
        kernels.append(name)
        emulated_launch(name, device, *args)
    monkeypatch.setattr(_cuda_launch, "launch", counting)
    monkeypatch.setenv("LPA_POISON", "0")  # poisoning fills every new buffer: a launch that training never has
    assert not head_loop.use_class_space(40, 32, 100, 1, "add", torch.float32, False), "test setup: the rows form runs"
    launches = {}
    for steps in (1, 3):
        h, y, weight, bias, delta = make_head_problem(40, 100, 32, labels=make_labels(40, 100, dtype=labels_dtype))
        kernels.clear()
        with LaunchCounter() as counter:
            lpa_kernels.head_pgd_(h, y, weight, bias, delta, steps, 0.1, 0.3, 1.0, "l2", "add", backend="cuda")
        launches[steps] = counter.summary()["aten_launches"] + len(kernels)
    assert launches[3] - launches[1] == 2 * 5, launches


@pytest.mark.parametrize("mode, norm, direction", [("add", "l2", "confidence"), ("scale", "linf", -1.0)])
def test_head_pgd_rows_on_the_classes_present(cuda_backend_on_cpu, monkeypatch, mode, norm, direction):
    """The rows form on the rows of the classes present (``loop.compacts``; 23 samples of 9 of 300 classes)
    through the CUDA launchers: the reference's result, bit for bit the full form's, absent rows unchanged."""
    check_compacted(("cuda", "cpu"), torch.float32, mode, norm, direction, monkeypatch)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # a class's infinite delta row
def test_head_pgd_rows_on_the_classes_present_under_the_guard(cuda_backend_on_cpu, monkeypatch):
    """The same under the training step's guard: restored rows and the count as the full form's."""
    check_guard(("cuda", "cpu"), True, monkeypatch)


@pytest.mark.parametrize("batch, num_classes, features, bias, direction", [
    (5, 1, 7, True, "confidence"),  # K = 1: softmax is 1, the gradient exactly 0, delta unchanged
    (3, 3, 300, False, -1.0),  # D wider than a block: threads own several columns; no bias
    (9, 4, 16, True, torch.tensor([1.0, -1.0, 0.0, 0.5])),  # per-class directions, int32 labels
])
def test_head_pgd_class_counts_widths_and_directions(cuda_backend_on_cpu, batch, num_classes, features, bias, direction):
    h, y, weight, b, delta = make_head_problem(batch, num_classes, features, bias=bias)
    actual = check_head_pgd(("cuda", "cpu"), h, y.int(), weight, b, delta, steps=2, step_size=0.05, eps=0.2,
                            direction=direction, norm="l2", mode="scale")
    if num_classes == 1:
        assert torch.equal(actual, delta), "with one class the gradient is exactly 0, yet delta moved"


@pytest.mark.parametrize("dtype", fused_checks.GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("batch, classes", fused_checks.SHAPES)
def test_head_pgd_fused_class_space(cuda_backend_on_cpu, monkeypatch, dtype, norm, batch, classes):
    """Every class-space step in one launch (csrc/head_pgd_fused.cu: wmma tiles for fp16/bf16, FMA loops for
    fp32) against the definition: K = 1, 17 (a full block of 16 and one class), 40; class 2 absent."""
    fused_checks.check_fused_steps(("cuda", "cpu"), dtype, norm, batch, classes, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_pgd_fused_class_space_several_gemm_tiles(cuda_backend_on_cpu, monkeypatch, dtype):
    """K = 70, D = 130: the block GEMMs' 64-column output tiles, two for E (the last ragged) and three for G
    (the last ragged), each over several 32-deep chunks."""
    fused_checks.check_fused_steps(("cuda", "cpu"), dtype, "l2", 90, 70, monkeypatch, features=130)


def test_head_pgd_fused_class_space_nan_sample(cuda_backend_on_cpu, monkeypatch):
    fused_checks.check_nan_sample_reaches_its_own_class_only(("cuda", "cpu"), monkeypatch)


@pytest.mark.parametrize("data_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("ok", [None, True, False])
def test_head_pgd_fused_class_space_applies_the_training_guard(cuda_backend_on_cpu, monkeypatch, data_dtype, ok):
    fused_checks.check_guard_in_the_launch(("cuda", "cpu"), monkeypatch, data_dtype, ok)


def test_head_pgd_fused_class_space_is_one_launch_whatever_the_steps(cuda_backend_on_cpu, monkeypatch):
    """B = 64 >> K = 4 with a given direction: T = 1 and T = 3 launch the same CUDA C++ kernels, the fused
    one once (the rest is the call's set-up: its label plan)."""
    emulated_launch, kernels = _cuda_launch.launch, []

    def counting(name, device, *args):
        kernels.append(name)
        emulated_launch(name, device, *args)
    monkeypatch.setattr(_cuda_launch, "launch", counting)
    launched = {}
    for steps in (1, 3):
        h, y, weight, bias, delta = make_head_problem(64, 4, 32)
        kernels.clear()
        lpa_kernels.head_pgd_(h, y, weight, bias, delta, steps, 0.1, 0.3, 1.0, "l2", "add", backend="cuda")
        launched[steps] = list(kernels)
    assert launched[1] == launched[3] and launched[3].count("class_space_steps") == 1, launched


@pytest.mark.parametrize("dtypes", PROJECTION_DTYPES)
def test_pgd_step_l2_projection_stays_inside_eps(launchers, pgd_grid, dtypes):
    """Inside eps, also a float32 delta stepped in float64 (the launcher steps a float64 copy with eps shrunk by
    float32's margin, ``l2_iterate_eps``)."""
    check_l2_projection_inside_eps(
        lambda delta, grad, step, eps: launchers.pgd_step(delta, grad, step, eps, torch.ones_like(eps), "l2"),
        dtypes, "cpu")


def test_head_pgd_l2_steps_of_a_float32_delta_with_float64_data_stay_inside_eps(cuda_backend_on_cpu):
    check_float32_delta_with_float64_data_inside_eps("cuda", "cpu")


def test_fused_l2_step_of_a_float32_delta_from_float64_gradients_stays_inside_eps(cuda_backend_on_cpu):
    check_fused_step_inside_eps("cuda", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step_l2_with_inf_and_huge_gradients_stays_finite_and_inside_eps(launchers, pgd_grid, dtype):
    """Rows far outside the ball: one with an Inf entry, one with Inf entries of both signs, one whose
    squared norm overflows float32; every row ends finite with norm <= eps (float64, stored values)."""
    from tests.pgd.test_pgd import inf_sign_pattern_step

    K, D, inf = 5, 301, float("inf")
    delta, grad = 1000 * torch.randn(K, D, dtype=dtype), torch.randn(K, D, dtype=dtype)
    grad[0, 3] = inf
    grad[1, :4] = torch.tensor([inf, -inf, -inf, inf])
    grad[2] *= 1e30
    step, eps = torch.full((K,), 2000.0, dtype=dtype), torch.logspace(-2, 2, K, dtype=dtype)
    expected = inf_sign_pattern_step(delta[:2], grad[:2], 2000.0, eps[:2, None].double())
    launchers.pgd_step(delta, grad, step, eps, torch.ones(K, dtype=dtype), "l2")
    assert torch.isfinite(delta).all()
    assert (delta.double().norm(dim=1) <= eps.double()).all()
    assert_close_to_reference(delta[:2], expected, what="Inf rows")


def test_pgd_step_l2_of_delta_rows_holding_inf_or_nan(launchers, pgd_grid):
    """tests/pgd/test_pgd.py's check (the split grid's expansion made an Inf row NaN, unprojected)."""
    from tests.pgd.test_pgd import check_non_finite_delta_rows

    check_non_finite_delta_rows(lambda d, g, s, e, r: launchers.pgd_step(d, g, s, e, r, "l2"), "cpu")


def test_class_grad_pgd_step_l2_with_an_inf_sample_stays_finite(launchers):
    grad_out, labels = torch.randn(9, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    grad_out[4, 5] = float("inf")  # a sample of class 1
    delta = torch.randn(3, 12)
    step, eps, direction = torch.full((3,), 0.5), torch.full((3,), 0.3), torch.ones(3)
    launchers.class_grad_pgd_step(delta, grad_out, labels, None, step, eps, direction, 1, "add", "l2")
    assert torch.isfinite(delta).all()
    assert (delta.double().norm(dim=1) <= 0.3).all()


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_head_pgd_wide_rows(cuda_backend_on_cpu, mode):
    """K = 2,100 classes: the softmax kernel gives each row a whole block of 256 lanes (K >= 2048), each
    striding over 8 or 9 columns, with a ragged last stride; 5 samples, the confidence rule."""
    h, y, weight, bias, delta = make_head_problem(5, 2100, 12)
    check_head_pgd(("cuda", "cpu"), h, y, weight, bias, delta, steps=2, step_size=0.05, eps=0.2,
                   direction="confidence", norm="l2", mode=mode)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("num_classes", [24, 2048])
def test_softmax_xent_grad_vector_and_scalar_rows(launchers, dtype, aligned, num_classes):
    """The rows form's softmax kernel on its own: K = 24 (a multiple of every vector width: 16-byte
    loads when the rows are aligned; 32 lanes per row) and K = 2048 (a whole block per row), rows
    offset by one element (scalar path), in place, with the true-class probabilities."""
    batch = 7
    logits = torch.randn(batch, num_classes).to(dtype) if aligned else _misaligned((batch, num_classes), dtype)
    labels = make_labels(batch, num_classes)
    out = logits.clone() if aligned else _misaligned((batch, num_classes), dtype).copy_(logits)
    p_true = torch.full((batch,), float("nan"), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    launchers.softmax_xent_grad(out, out, labels, p_true)

    def reference(z):
        probs = torch.softmax(z, dim=1)
        return probs - torch.nn.functional.one_hot(labels, num_classes).to(probs.dtype), probs[torch.arange(batch), labels]

    expected, expected_p = reference(logits.double())
    lowp, lowp_p = reference(logits.float() if dtype != torch.float64 else logits)
    assert_close_to_reference(out, expected, lowp.to(dtype), what="softmax - onehot")
    assert_close_to_reference(p_true, expected_p, lowp_p, what="true-class probability")


# The fused per-step ops of the training step (csrc/step_update.cu) against their reference, through the
# same checks as the Triton kernels (tests/step_update); K = 300 spans two class blocks of the policy and
# a batch of 300 two sample tiles of the label plan.
@pytest.mark.parametrize("batch,num_classes", [(0, 3), (1, 1), (33, 10), (300, 7), (70, 1000)])
@pytest.mark.parametrize("bad", ["none", "high", "negative"])
def test_checked_label_plan(launchers, batch, num_classes, bad):
    for label_dtype in (torch.int64, torch.int32):
        step_update_tests.test_checked_label_plan_equals_reference(("cuda", "cpu"), batch, num_classes, bad, label_dtype)


@pytest.mark.parametrize("batch,num_classes,bad,label_dtype", step_update_tests.SORTED_CASES)
def test_sorted_label_plan(launchers, batch, num_classes, bad, label_dtype, monkeypatch):
    """The sorted plan (above B x K = 2^21, up to 4096 samples): one block's bitonic sort, then the class starts."""
    step_update_tests.test_sorted_label_plan_equals_reference(("cuda", "cpu"), batch, num_classes, bad, label_dtype,
                                                              monkeypatch)


@pytest.mark.parametrize("sort", [False, True], ids=["one-launch", "sorted"])
def test_label_plan_op_passes_opcheck(launchers, sort):
    step_update_tests.test_label_plan_op_passes_opcheck(("cuda", "cpu"), sort)


@pytest.mark.parametrize("sort", [False, True], ids=["one-launch", "sorted"])
def test_bad_batch_record_is_exact_at_the_int64_extremes(launchers, sort, monkeypatch):
    step_update_tests.test_bad_batch_record_is_exact_at_the_int64_extremes(("cuda", "cpu"), sort, monkeypatch)


@pytest.mark.parametrize("batch,num_classes", [(0, 3), (7, 3), (33, 10), (70, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_stats(launchers, batch, num_classes, dtype):
    for accumulate, ok, nonfinite in [(False, True, False), (True, True, True), (True, False, True)]:
        step_update_tests.test_class_stats_equal_reference(("cuda", "cpu"), batch, num_classes, dtype, accumulate, ok,
                                                           nonfinite)


@pytest.mark.parametrize("num_classes", [1, 3, 300])
@pytest.mark.parametrize("direction,radius", step_update_tests.POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy(launchers, num_classes, direction, radius, dtype):
    for observe, clear in [(False, False), (True, True)]:
        step_update_tests.test_policy_equals_reference(("cuda", "cpu"), num_classes, direction, radius, observe, clear,
                                                       dtype)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("num_classes", [24, 2048])
def test_softmax_class_sum(launchers, dtype, num_classes):
    """The class-space step's fused kernel on its own: K = 24 (32 lanes per sample, 8 samples per round)
    and K = 2048 (a whole block per sample), 19 samples over classes 0-5 only (the other rows must be
    written as zeros), with the true-class probabilities. In float16 each class's row is scaled by
    1 / 2^floor(log2 n_c) (HeadKernels.softmax_class_sum), in the other dtypes not."""
    from lpa_kernels._common import class_order

    batch = 19
    logits, shift = torch.randn(batch, num_classes).to(dtype), torch.randn(num_classes, num_classes).to(dtype)
    labels = make_labels(batch, 6)
    order, starts = class_order(labels, num_classes)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sums = torch.full((num_classes, num_classes), float("nan")).to(dtype)
    p_true = torch.full((batch,), float("nan"), dtype=acc)
    launchers.softmax_class_sum(sums, logits, shift, labels, order, starts, p_true, torch.empty(2, batch, dtype=acc))

    counts = torch.bincount(labels, minlength=num_classes).tolist()
    scale = torch.tensor([2.0 ** -math.floor(math.log2(max(n, 1))) if dtype == torch.float16 else 1.0
                          for n in counts], dtype=torch.float64)

    def reference(z, s):
        probs = torch.softmax(z + s[labels], dim=1)
        grad = probs - torch.nn.functional.one_hot(labels, num_classes).to(probs.dtype)
        sums = torch.zeros_like(s).index_add_(0, labels, grad) * scale.to(s.dtype)[:, None]
        return sums, probs[torch.arange(batch), labels]

    expected, expected_p = reference(logits.double(), shift.double())
    lowp, lowp_p = reference(logits.to(acc), shift.to(acc))
    assert_close_to_reference(sums, expected, lowp.to(dtype), what="per-class softmax - onehot")
    assert_close_to_reference(p_true, expected_p, lowp_p, what="true-class probability")
    assert torch.equal(sums[6:], torch.zeros_like(sums[6:])), "absent classes' rows are not zero"
