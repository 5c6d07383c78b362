"""linear_perturb's fast backends against the float64 reference: forward and the gradients for x,
weight, bias and delta, every activation x mode x input rank x bias, odd and empty sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lpa_kernels import linear_perturb
from lpa_kernels.linear_perturb import naive, triton_kernels
from tests.helpers import KERNEL_TARGETS, assert_close_to_reference, make_labels

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
MODES = ("add", "scale")
GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias", "grad_delta")


def make_inputs(dtype, device, x_shape, out_features, classes, bias=True, labels=None):
    """Random ``(x, weight, bias, labels, delta)``, drawn in float64 and rounded to ``dtype``."""
    in_features = x_shape[-1]
    x = torch.randn(x_shape, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, dtype=torch.float64) / math.sqrt(max(in_features, 1))
    b = torch.randn(out_features, dtype=torch.float64) if bias else None
    delta = 0.5 * torch.randn(classes, out_features, dtype=torch.float64)
    labels = make_labels(x_shape[0], classes) if labels is None else labels
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b), labels.to(device), cast(delta)


def eager_chain(x, weight, bias, labels, delta, activation, mode):
    """F.linear, the activation and the perturbation as separate PyTorch ops in the inputs' dtype: the
    error PyTorch itself makes in that dtype (the ``lowp`` of the tolerance rule)."""
    a = naive.ACTIVATION_FNS[activation](F.linear(x, weight, bias))
    d = delta[labels].view(x.shape[0], *([1] * (x.dim() - 2)), -1)
    return a + d if mode == "add" else a * (1 + d)


def forward_and_grads(fn, inputs, grad_out):
    """``(out, grad_x, grad_weight, grad_bias, grad_delta)`` of ``fn`` on leaf copies of ``inputs``."""
    x, weight, bias, labels, delta = (None if t is None else t.detach() for t in inputs)
    leaves = [t.requires_grad_() for t in (x, weight, bias, delta) if t is not None]
    out = fn(x, weight, bias, labels, delta)
    grads = list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
    if bias is None:
        grads.insert(2, None)
    return (out, *grads)


def check_against_reference(target, dtype, x_shape, out_features, classes, activation, mode, bias=True, labels=None):
    backend, device = target
    inputs = make_inputs(dtype, device, x_shape, out_features, classes, bias, labels)
    out_shape = (*x_shape[:-1], out_features)
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(dtype)
    kernel = forward_and_grads(
        lambda *a: linear_perturb(*a, activation=activation, mode=mode, backend=backend), inputs, grad_out.to(device))
    cpu64 = [None if t is None else (t.cpu().double() if t.is_floating_point() else t.cpu()) for t in inputs]
    reference = forward_and_grads(lambda *a: naive.linear_perturb(*a, activation, mode), cpu64, grad_out.double())
    cpu = [None if t is None else t.cpu() for t in inputs]
    lowp = forward_and_grads(lambda *a: eager_chain(*a, activation, mode), cpu, grad_out)
    assert kernel[0].dtype == dtype, f"output dtype {kernel[0].dtype} != x.dtype {dtype}"
    for name, k, r, lp in zip(("output",) + GRAD_NAMES, kernel, reference, lowp):
        if r is None:
            assert k is None, f"{name} should be None without a bias"
            continue
        assert k.dtype == dtype, f"{name} dtype {k.dtype} != input dtype {dtype}"
        assert_close_to_reference(k, r, lowp=lp, what=f"{backend} {name} ({activation}, {mode}, x {tuple(x_shape)})")


X_SHAPES = {"2d": (13, 19), "3d": (3, 5, 19)}  # M = 13 or 15 rows, in = 19, out = 23: no multiple of a block


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("rank", list(X_SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_forward_and_grads_match_reference(target, activation, mode, rank, bias):
    check_against_reference(target, torch.float32, X_SHAPES[rank], 23, 5, activation, mode, bias)


# Half precision: every activation once per dtype, modes, ranks and bias rotating along the diagonal.
HALF_CASES = [
    pytest.param(dtype, act, MODES[(i + j) % 2], list(X_SHAPES)[(i + j + 1) % 2], (i + j) % 3 != 2,
                 id=f"{str(dtype)[6:]}-{act}")
    for j, dtype in enumerate((torch.float16, torch.bfloat16))
    for i, act in enumerate(ACTIVATIONS)
]


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype,activation,mode,rank,bias", HALF_CASES)
def test_half_precision_forward_and_grads_match_reference(target, dtype, activation, mode, rank, bias):
    check_against_reference(target, dtype, X_SHAPES[rank], 23, 5, activation, mode, bias)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("x_shape,out_features,classes", [
    pytest.param((1, 7), 9, 1, id="B1-K1"),
    pytest.param((1, 3, 7), 9, 1, id="B1-T3-K1"),
    pytest.param((70, 80), 67, 2, id="several-tiles-and-pieces"),  # > one 64-block in M, N and in
    pytest.param((5, 9, 33), 17, 3, id="3d-several-pieces"),
])
def test_odd_sizes_match_reference(target, x_shape, out_features, classes):
    check_against_reference(target, torch.float32, x_shape, out_features, classes, "gelu", "scale")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("mode", MODES)
def test_single_class_batch_gives_zero_grad_for_absent_classes(target, mode):
    labels = torch.full((21,), 2, dtype=torch.int32)
    check_against_reference(target, torch.float32, (21, 11), 13, 4, "silu", mode, labels=labels)


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("x_shape", [(0, 7), (0, 3, 7), (4, 0, 7)], ids=["B0", "B0-T3", "T0"])
def test_empty_batch(target, x_shape):
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, x_shape, 6, 3)
    leaves = [t.requires_grad_() for t in (x, weight, bias, delta)]
    out = linear_perturb(x, weight, bias, labels, delta, backend=backend)
    assert out.shape == (*x_shape[:-1], 6), f"output shape {tuple(out.shape)} for x {x_shape}"
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for name, grad, leaf in zip(GRAD_NAMES, grads, leaves):
        assert grad.shape == leaf.shape, f"{name} shape {tuple(grad.shape)} != {tuple(leaf.shape)}"
        assert torch.equal(grad, torch.zeros_like(leaf)), f"{name} of an empty batch must be zero"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_non_contiguous_inputs(target):
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (11, 3, 9), 10, 4)
    args = (x.transpose(0, 1).contiguous().transpose(0, 1), weight.t().contiguous().t(), bias,
            labels.repeat_interleave(2)[::2], delta.t().contiguous().t())
    assert not any(t.is_contiguous() for t in (args[0], args[1], args[4])), "the views must be non-contiguous"
    out = linear_perturb(*args, activation="gelu_tanh", mode="scale", backend=backend)
    reference = naive.linear_perturb(*(t.double() if t.is_floating_point() else t for t in args), "gelu_tanh", "scale")
    assert_close_to_reference(out, reference, what="output from non-contiguous inputs")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("activation,mode", [("relu", "add"), ("gelu", "scale"), ("none", "scale")])
def test_launcher_preact_is_the_linear_output(target, activation, mode):
    """The saved pre-activation (which the backward reads) is x @ weight.T + bias; without save_preact
    the launcher returns an empty tensor instead."""
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (3, 4, 19), 23, 5)
    launchers = triton_kernels if backend == "triton" else pytest.importorskip("lpa_kernels.linear_perturb.cuda_kernels")
    _, preact = launchers.linear_perturb_forward(x.reshape(12, 19), weight, bias, labels, 4, delta, activation, mode, True)
    reference = F.linear(x.reshape(12, 19).double(), weight.double(), bias.double())
    assert_close_to_reference(preact, reference, what="saved pre-activation")
    _, none = launchers.linear_perturb_forward(x.reshape(12, 19), weight, bias, labels, 4, delta, activation, mode, False)
    assert none.numel() == 0, "save_preact=False must not return a pre-activation"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_backward_is_deterministic(target):
    backend, device = target
    inputs = make_inputs(torch.float32, device, (40, 3, 8), 20, 3)
    grad_out = torch.randn(40, 3, 20, device=device)
    run = lambda: forward_and_grads(  # noqa: E731
        lambda *a: linear_perturb(*a, activation="silu", mode="scale", backend=backend), inputs, grad_out)
    first, second = run(), run()
    for name, a, b in zip(GRAD_NAMES, first[1:], second[1:]):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def _gradcheck_inputs(device):
    x, weight, bias, labels, delta = make_inputs(torch.float64, device, (3, 2, 4), 5, 2)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, delta.requires_grad_()


def test_reference_gradcheck_float64():
    x, weight, bias, labels, delta = _gradcheck_inputs("cpu")
    for activation in ACTIVATIONS:
        for mode in MODES:
            fn = lambda x, w, b, d: linear_perturb(x, w, b, labels, d, activation, mode, backend="reference")  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x, weight, bias, delta)), f"reference gradcheck {activation} {mode}"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_gradcheck_float64(target, activation, mode):
    """float64 runs through the kernels themselves (tl.dot included), so gradcheck tests them. Fast mode
    (random projections of the Jacobian) for the cross product, the full Jacobian for one case."""
    backend, device = target
    x, weight, bias, labels, delta = _gradcheck_inputs(device)
    fn = lambda x, w, b, d: linear_perturb(x, w, b, labels, d, activation, mode, backend=backend)  # noqa: E731
    fast = (activation, mode) != ("gelu", "scale")
    assert torch.autograd.gradcheck(fn, (x, weight, bias, delta), fast_mode=fast), f"{backend} gradcheck {activation} {mode}"


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_kernel_double_backward_raises_instead_of_dropping_the_second_derivative(target):
    """create_graph through the fast backward: its act''(z) term is not differentiable there (preact is not),
    so a second derivative would be silently wrong (gelu: every entry alike); it raises, naming the way out."""
    backend, device = target
    x, weight, bias, labels, delta = _gradcheck_inputs(device)
    out = linear_perturb(x, weight, bias, labels, delta, "gelu", "add", backend=backend)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    out = linear_perturb(x, weight, bias, labels, delta, "gelu", "add", backend="reference")
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert torch.autograd.grad(grad_x.sum(), weight)[0].abs().sum() > 0


@pytest.mark.parametrize("target", [KERNEL_TARGETS[0]])
def test_gpu_autotuned_forward_wiring(target, monkeypatch):
    """The autotuned forward kernel a GPU uses (grid from the chosen config, config pruning), run in the
    interpreter on a shape where pruning leaves a single config, so nothing needs timing."""
    backend, device = target
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    check_against_reference(target, torch.float32, (13, 19), 23, 5, "gelu", "scale")


@pytest.mark.parametrize("target", [KERNEL_TARGETS[0]])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_gpu_epilogue_in_column_halves(target, tma, monkeypatch):
    """EPILOGUE_HALVES (the large GPU tiles' epilogue, run on half the columns at a time) on ragged
    tiles, in both GEMM kernels; the autotuners are left one config each, so nothing needs timing."""
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(triton_kernels, "tma_capable", lambda device: tma)
    if tma:
        config = triton_kernels._tma_config(32, 32, 4, 1, halves=True)
        monkeypatch.setattr(triton_kernels._forward_tma_kernel_autotuned, "configs", [config])
        monkeypatch.setattr(triton_kernels, "_forward_kernel_autotuned", None)  # must not be reached
    else:
        config = triton_kernels._gpu_config(32, 32, 32, 4, 1, halves=True)
        monkeypatch.setattr(triton_kernels._forward_kernel_autotuned, "configs", [config])
    check_against_reference(target, torch.bfloat16, (3, 5, 24), 45, 4, "silu", "scale")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tensor_descriptor_forward_on_gpu(dtype):
    """On an sm_90+ GPU the autotuned TMA kernel (every config is timed, so every config runs) on
    ragged tiles: M, N not multiples of any block, IN a multiple of 8 (TMA-addressable)."""
    if not triton_kernels.tma_capable(torch.device("cuda")):
        pytest.skip("needs an sm_90+ GPU")
    assert triton_kernels._use_tma(torch.empty(1, 264, device="cuda", dtype=dtype),
                                   torch.empty(1, 264, device="cuda", dtype=dtype))
    check_against_reference(("triton", "cuda"), dtype, (300, 264), 333, 7, "gelu", "scale")


def test_tma_is_used_only_where_a_descriptor_can_address_both_operands(monkeypatch):
    """TensorDescriptor.from_tensor asserts on a row stride that is not 16-byte aligned and on an empty
    operand: such GEMMs take the pointer kernel (checked on CPU tensors, the device made TMA-capable)."""
    monkeypatch.setattr(triton_kernels, "tma_capable", lambda device: True)
    bf16 = lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16)  # noqa: E731
    assert triton_kernels._use_tma(bf16(4, 24), bf16(5, 24))
    assert not triton_kernels._use_tma(bf16(4, 0), bf16(5, 0)), "IN = 0"
    one_row = bf16(2, 17)[:1, :16]  # contiguous by PyTorch's rule, row stride 17 elements (34 bytes)
    assert one_row.is_contiguous() and not triton_kernels._use_tma(bf16(4, 16), one_row), "weight row stride"
    assert not triton_kernels._use_tma(one_row, bf16(5, 16)), "x row stride"
    assert not triton_kernels._use_tma(bf16(4, 19), bf16(5, 19)), "IN * 2 bytes not a multiple of 16"


@pytest.mark.parametrize("target", [KERNEL_TARGETS[0]])
@pytest.mark.parametrize("in_features,tma_used", [(24, True), (19, False)], ids=["aligned", "unaligned"])
def test_gpu_tensor_descriptor_forward_wiring(target, in_features, tma_used, monkeypatch):
    """On a TMA device 2-byte GEMMs go through the tensor-descriptor kernel when TMA can address the
    operands (row stride a multiple of 16 bytes), else through the pointer kernel; both against the
    reference, the one not expected made unreachable."""
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(triton_kernels, "tma_capable", lambda device: True)
    unused = "_forward_kernel_autotuned" if tma_used else "_forward_tma_kernel_autotuned"
    monkeypatch.setattr(triton_kernels, unused, None)
    check_against_reference(target, torch.float16, (13, in_features), 23, 5, "relu", "add")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_grads_when_only_weight_and_delta_need_them(target):
    """x without requires_grad (network input): the op keeps x but not weight for the backward."""
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (7, 2, 9), 11, 3)
    weight.requires_grad_(), delta.requires_grad_()
    out = linear_perturb(x, weight, bias, labels, delta, "relu", "scale", backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (weight, delta), grad_out)
    w64, d64 = weight.detach().double().requires_grad_(), delta.detach().double().requires_grad_()
    reference = naive.linear_perturb(x.double(), w64, bias.double(), labels, d64, "relu", "scale")
    for name, grad, ref in zip(("grad_weight", "grad_delta"), grads, torch.autograd.grad(reference, (w64, d64), grad_out.double())):
        assert_close_to_reference(grad, ref, what=name)


def _saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves for the backward of ``fn(*args)``, other than the
    arguments' own (which exist anyway): the memory the forward adds until the backward runs."""
    inputs = {t.untyped_storage().data_ptr() for t in args}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("activation,mode", [("relu", "add"), ("gelu", "scale"), ("none", "add")])
def test_saves_no_more_than_the_eager_chain(target, activation, mode):
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (16, 3, 24), 40, 4)
    for t in (x, weight, bias, delta):
        t.requires_grad_()
    fused = _saved_bytes(lambda *a: linear_perturb(*a, activation, mode, backend=backend), x, weight, bias, labels, delta)
    eager = _saved_bytes(lambda *a: eager_chain(*a, activation, mode), x, weight, bias, labels, delta)
    assert fused <= eager, f"fused op saves {fused} new bytes for the backward, the eager chain {eager}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_float32_forward_follows_torch_tf32_switch(backend, allow_tf32, monkeypatch):
    """float32 forward GEMM: IEEE fp32 when ``torch.backends.cuda.matmul.allow_tf32`` is off (error within
    the tolerance rule against torch's IEEE matmul); TF32 when it is on (error within twice torch's own
    TF32 matmul's, and well above the IEEE error, so TF32 did run). IN = 1024: TF32's 10-bit mantissa
    shows."""
    x, weight, bias, labels, delta = make_inputs(torch.float32, "cuda", (300, 1024), 333, 7)
    reference = naive.linear_perturb(*(t.cpu().double() if t.is_floating_point() else t.cpu()
                                       for t in (x, weight, bias, labels, delta)), "none", "add")

    def eager_error(tf32: bool) -> float:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
        return (eager_chain(x, weight, bias, labels, delta, "none", "add").double().cpu() - reference).abs().max().item()

    ieee_error, tf32_error = eager_error(False), eager_error(True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    out = linear_perturb(x, weight, bias, labels, delta, "none", "add", backend=backend)
    error = (out.double().cpu() - reference).abs().max().item()
    if allow_tf32:
        assert 10 * ieee_error < error <= 2 * tf32_error, \
            f"{backend}: error {error:.3e} (torch's IEEE {ieee_error:.3e}, TF32 {tf32_error:.3e})"
    else:
        assert error <= 2 * ieee_error, f"{backend}: error {error:.3e} above twice torch's IEEE error {ieee_error:.3e}"


@pytest.mark.parametrize("target", [pytest.param(("reference", "cpu"), id="reference"), *KERNEL_TARGETS])
def test_zero_input_features(target):
    """x (B, 0): the GEMM is empty, out = act(bias) + delta[y]; gradients of bias and delta as defined (the
    Triton launcher could not reshape an empty x, and a TMA descriptor would refuse it)."""
    backend, device = target
    x, weight = torch.randn(4, 0, device=device, requires_grad=True), torch.randn(5, 0, device=device, requires_grad=True)
    bias, delta = torch.randn(5, device=device, requires_grad=True), torch.randn(3, 5, device=device, requires_grad=True)
    labels = make_labels(4, 3, device)
    out = linear_perturb(x, weight, bias, labels, delta, "relu", "add", backend=backend)
    expected = torch.relu(bias.detach()) + delta.detach()[labels]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(bias.grad, 4.0 * (bias.detach() > 0))
    torch.testing.assert_close(delta.grad, torch.zeros_like(delta).index_add_(0, labels, torch.ones(4, 5, device=device)))


class _RecordedLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the grid and runs nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def test_backward_launches_fit_a_gpus_grid_at_millions_of_output_features(monkeypatch):
    """The backward epilogue's (piece, column block) and the class sum's (class, column block) programs
    go on the grid's x axis: with column blocks on y, more than 65,535 of them (N > 65,535 x BLOCK_N
    output features) did not launch. The launcher's grids at N = 64 x 65,535 + 1 (the GPU's BLOCK_N is up
    to 128, the interpreter's 64), recorded instead of run."""
    from tests.launch_limits import GRID_LIMITS

    grids = []
    for name in ("_backward_epilogue_kernel", "_class_sum_kernel"):
        monkeypatch.setattr(triton_kernels, name, _RecordedLaunch(grids))
    N, K = 64 * 65535 + 1, 2
    grad_out = torch.zeros(3, N)
    triton_kernels.linear_perturb_backward_epilogue(grad_out, torch.empty(0), torch.tensor([0, 1, 1]), 1,
                                                    torch.zeros(K, N), "none", "add")
    assert len(grids) == 2
    for grid in grids:
        assert all(n <= limit for n, limit in zip(grid, GRID_LIMITS)), f"grid {grid} exceeds {GRID_LIMITS}"
    assert grids[1] == (K * -(-N // 64),) or grids[1] == (K * -(-N // 128),)
