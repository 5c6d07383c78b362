"""CUDA-backend cases the shared op tests (parametrized over KERNEL_TARGETS) do not reach: the scalar
path of misaligned tensors and the vector tail, class reductions split across blocks, both load paths
of the tensor-core GEMM and the float32 epilogue path, and the launchers' own argument errors.
All run on a GPU only (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import class_grad, class_grad_pgd_step_, linear_perturb, perturb
from lpa_kernels.perturb import cuda_kernels as perturb_cuda
from lpa_kernels.linear_perturb import naive as linear_naive
from lpa_kernels.perturb import naive
from lpa_kernels.pgd import naive as pgd_naive
from tests.helpers import DTYPES, assert_close_to_reference, make_labels

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _misaligned(shape, dtype):
    """A contiguous tensor whose data starts 2 bytes past a 16-byte boundary (forces the scalar path)."""
    numel = torch.Size(shape).numel()
    storage = torch.randn(numel + 8, device=DEVICE).to(dtype)
    return storage[1:numel + 1].view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_perturb_forward_vector_tail_and_misaligned_input(dtype, mode, aligned):
    """B * F = 3 * 7 * 5 * 5 is not a multiple of any vector width: the tail elements must be right."""
    shape = (3, 7, 5, 5)
    h = torch.randn(shape, device=DEVICE).to(dtype) if aligned else _misaligned(shape, dtype)
    labels = make_labels(3, 4, DEVICE)
    for delta_shape in [(4, 7, 5, 5), (4, 7, 1, 1), (4, 5)]:
        delta = torch.randn(delta_shape, device=DEVICE).to(dtype)
        out = perturb(h, labels, delta, mode, backend="cuda")
        ref = naive.perturb(h.double(), labels, delta.double(), mode)
        lowp = naive.perturb(h, labels, delta, mode)
        assert_close_to_reference(out, ref, lowp, what=f"perturb delta {delta_shape} aligned={aligned}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "classes", "delta_shape"), [
    (4099, 1, (1, 3, 1, 1)),   # one class, three groups: samples split across many blocks
    (2053, 2, (2, 3, 4, 4)),   # full layout, few classes
    (1537, 3, (3, 4)),         # last-dim layout
])
def test_class_grad_split_across_blocks_matches_and_is_reproducible(dtype, batch, classes, delta_shape):
    grad_out = torch.randn(batch, 3, 4, 4, device=DEVICE).to(dtype)
    h = torch.randn(batch, 3, 4, 4, device=DEVICE).to(dtype)
    labels = make_labels(batch, classes, DEVICE)
    for mode in ("add", "scale"):
        first = class_grad(grad_out, labels, classes, delta_shape, h=h, mode=mode, backend="cuda")
        second = class_grad(grad_out, labels, classes, delta_shape, h=h, mode=mode, backend="cuda")
        assert torch.equal(first, second), f"class_grad ({mode}) differs between two identical runs"
        ref = naive.class_grad(grad_out.double(), labels, classes, delta_shape, h=h.double(), mode=mode)
        lowp = naive.class_grad(grad_out, labels, classes, delta_shape, h=h, mode=mode, out_dtype=torch.float32)
        assert_close_to_reference(first, ref, lowp, what=f"class_grad {mode} {delta_shape}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("delta_dtype", DTYPES)
def test_class_grad_pgd_step_with_half_gradients_and_any_delta_dtype(norm, delta_dtype):
    """grad_out bfloat16 with delta of each dtype (float16 delta goes through a float32 copy)."""
    grad_out = torch.randn(37, 6, 5, device=DEVICE, dtype=torch.bfloat16)
    labels = make_labels(37, 4, DEVICE)
    delta = (0.1 * torch.randn(4, 6, 5, device=DEVICE)).to(delta_dtype)
    ref = pgd_naive.class_grad_pgd_step_(delta.double(), grad_out.double(), labels, *(torch.full((4,), v, device=DEVICE, dtype=torch.float64) for v in (0.05, 0.2, -1.0)), norm)
    class_grad_pgd_step_(delta, grad_out, labels, 0.05, 0.2, -1.0, norm, backend="cuda")
    assert_close_to_reference(delta, ref, what=f"delta after class_grad_pgd_step_ ({norm})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features", [64, 45], ids=["vector-loads", "scalar-loads"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("mode", ["add", "scale"])
def test_linear_perturb_gemm_paths(dtype, in_features, activation, mode):
    """M = 3 * 43 and N = 70 are not multiples of the 64 x 64 tile; float32 takes the epilogue kernel."""
    x = torch.randn(3, 43, in_features, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(70, in_features, device=DEVICE) / in_features**0.5).to(dtype).requires_grad_()
    bias = torch.randn(70, device=DEVICE).to(dtype).requires_grad_()
    delta = (0.1 * torch.randn(5, 70, device=DEVICE)).to(dtype).requires_grad_()
    labels = make_labels(3, 5, DEVICE)
    out = linear_perturb(x, weight, bias, labels, delta, activation, mode, backend="cuda")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, bias, delta), grad)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, bias, delta)]
    ref = linear_naive.linear_perturb(inputs64[0], inputs64[1], inputs64[2], labels, inputs64[3], activation, mode)
    ref_grads = torch.autograd.grad(ref, inputs64, grad.double())
    lowp = linear_naive.linear_perturb(x, weight, bias, labels, delta, activation, mode)
    assert_close_to_reference(out, ref, lowp, what="linear_perturb output")
    lowp_grads = torch.autograd.grad(lowp, (x, weight, bias, delta), grad)
    for name, g, r, lg in zip(("x", "weight", "bias", "delta"), grads, ref_grads, lowp_grads):
        assert_close_to_reference(g, r, lg, what=f"grad_{name}")


def test_class_reductions_over_more_classes_than_a_grid_axis_allows_elsewhere():
    """K = 70,000 > 65535 (the classes run along the grid's x axis): class_grad and class_grad_pgd_step_
    against the reference; the absent classes get a zero gradient and keep their delta."""
    K, D = 70_000, 6
    labels = torch.tensor([0, 69_999, 12_345, 69_999], device=DEVICE)
    grad_out = torch.randn(4, D, device=DEVICE)
    got = class_grad(grad_out, labels, K, (K, D), backend="cuda")
    assert_close_to_reference(got, naive.class_grad(grad_out.double(), labels, K, (K, D)), what="class_grad, K = 70,000")
    delta = 0.1 * torch.randn(K, D, device=DEVICE)
    ref = pgd_naive.class_grad_pgd_step_(delta.double(), grad_out.double(), labels, *(torch.full((K,), v, device=DEVICE,
                                         dtype=torch.float64) for v in (0.05, 0.3, 1.0)), "l2")
    before = delta.clone()
    class_grad_pgd_step_(delta, grad_out, labels, 0.05, 0.3, 1.0, "l2", backend="cuda")
    assert_close_to_reference(delta, ref, what="class_grad_pgd_step_, K = 70,000")
    assert torch.equal(delta[1:12_345], before[1:12_345]), "absent classes must keep their delta"


def test_reduction_launchers_refuse_a_grid_beyond_cuda_limits():
    """More than 65535 group tiles (one-element loads: 32 groups per block) is refused before any launch."""
    grad_out = _misaligned((1, 65535 * 32 + 1), torch.float32)
    with pytest.raises(ValueError, match="65535 group tiles"):
        perturb_cuda.perturb_backward(grad_out, None, torch.zeros(1, dtype=torch.int64, device=DEVICE), None, 1,
                                      65535 * 32 + 1, 1, "add", False, torch.float32)
