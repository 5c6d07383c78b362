"""perturb and class_grad: every backend x dtype x delta layout x mode against the float64 reference.

Each check runs the op forward and backward (grad_h and grad_delta from one backward call) and
compares all three with ``naive`` in float64; the low-precision yardstick is PyTorch eager autograd
in the inputs' own dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st

from lpa_kernels import class_grad, class_grad_pgd_step_, perturb
from lpa_kernels._common import padded_delta_shape
from lpa_kernels.perturb import naive
from tests.helpers import DTYPES, KERNEL_TARGETS, assert_close_to_reference, make_labels

TARGETS = [pytest.param(("reference", "cpu"), id="reference"), *KERNEL_TARGETS]
MODES = ("add", "scale")
# Feature shape F of one sample and per-class delta shape P, for each layout the ops serve.
LAYOUTS = {
    "full": ((3, 5, 7), (3, 5, 7)),
    "channel": ((3, 5, 7), (3, 1, 1)),
    "last_dim": ((6, 9), (1, 9)),
    "last_dim_short": ((6, 9), (9,)),
    "broadcast": ((3, 5, 7), (3, 1, 7)),  # not a kernel layout: the op expands delta to full
    "scalar": ((3, 5, 7), ()),  # one number per class
}


def random_inputs(batch, num_classes, features, per_class, dtype=torch.float32, device="cpu",
                  labels=None, label_dtype=torch.int64):
    """``(h, labels, delta, grad_out)``; by default the last class is absent from the batch."""
    h = torch.randn(batch, *features, device=device).to(dtype)
    if labels is None:
        labels = make_labels(batch, max(num_classes - 1, 1), device, label_dtype)
    delta = (0.5 * torch.randn(num_classes, *per_class, device=device)).to(dtype)
    grad_out = torch.randn(batch, *features, device=device).to(dtype)
    return h, labels, delta, grad_out


def eager_perturb(h, labels, delta, mode):
    """PyTorch eager in the inputs' own dtype (rounding after every operation): the lowp yardstick."""
    d = delta.reshape(padded_delta_shape(delta.shape, h.shape[1:]))[labels]
    return h + d if mode == "add" else h * (1 + d)


def forward_backward(fn, h, labels, delta, grad_out, mode):
    """``(h~, grad_h, grad_delta)`` of ``fn(h, labels, delta, mode)`` backpropagating ``grad_out``."""
    h, delta = h.detach().requires_grad_(), delta.detach().requires_grad_()
    out = fn(h, labels, delta, mode)
    out.backward(grad_out)
    return out.detach(), h.grad, delta.grad


def check_perturb(backend, h, labels, delta, grad_out, mode):
    """Forward, grad_h and grad_delta of ``perturb(backend=backend)`` equal the float64 reference."""
    got = forward_backward(lambda *a: perturb(*a, backend=backend), h, labels, delta, grad_out, mode)
    ref = forward_backward(naive.perturb, h.double(), labels, delta.double(), grad_out.double(), mode)
    lowp = forward_backward(eager_perturb, h, labels, delta, grad_out, mode)
    for what, a, r, low in zip(("perturb output", "grad_h", "grad_delta"), got, ref, lowp):
        assert a.dtype == low.dtype, f"{what}: dtype {a.dtype}, expected {low.dtype}"
        assert_close_to_reference(a, r, low, what=f"{what} ({backend}, {mode})")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_perturb_forward_and_gradients_match_reference(target, dtype, layout, mode):
    backend, device = target
    features, per_class = LAYOUTS[layout]
    check_perturb(backend, *random_inputs(7, 4, features, per_class, dtype, device), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "batch, num_classes, features, per_class",
    [
        (1, 3, (13,), (13,)),  # one sample
        (0, 3, (4, 5), (4, 1)),  # empty batch: grad_delta is all zero
        (6, 1, (5, 3), (5, 3)),  # one class
        (5, 1200, (6,), (6,)),  # many classes, most absent
        (3, 2, (1100,), (1100,)),  # more features than one block
        (9, 3, (2, 3, 31, 37), (1, 3, 1, 1)),  # channel-wise with a long odd inner run
    ],
    ids=["B1", "B0", "K1", "K1200", "F1100", "inner1147"],
)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_perturb_odd_sizes_match_reference(target, batch, num_classes, features, per_class, mode):
    backend, device = target
    check_perturb(backend, *random_inputs(batch, num_classes, features, per_class, device=device), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_perturb_non_contiguous_inputs_and_int32_labels(target, mode):
    backend, device = target
    h = torch.randn(6, 3, 7, 5, device=device).transpose(2, 3)  # (6, 3, 5, 7), strided
    delta = torch.randn(4, 7, 5, 3, device=device).permute(0, 3, 2, 1)  # (4, 3, 5, 7), strided
    grad_out = torch.randn(6, 5, 7, 3, device=device).permute(0, 3, 1, 2)
    labels = torch.randint(0, 4, (12,), dtype=torch.int32, device=device)[::2]
    assert not (h.is_contiguous() or delta.is_contiguous() or grad_out.is_contiguous() or labels.is_contiguous())
    check_perturb(backend, h, labels, delta, grad_out, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_perturb_gradient_of_one_input_only(target, mode):
    """The training step backpropagates to h alone (delta detached); PGD to delta alone."""
    backend, device = target
    h, labels, delta, grad_out = random_inputs(6, 3, (4, 5), (4, 1), torch.float16, device)
    ref = forward_backward(naive.perturb, h.double(), labels, delta.double(), grad_out.double(), mode)
    lowp = forward_backward(eager_perturb, h, labels, delta, grad_out, mode)
    for wanted in ("h", "delta"):
        leaves = {"h": h.detach().requires_grad_(wanted == "h"), "delta": delta.detach().requires_grad_(wanted == "delta")}
        perturb(leaves["h"], labels, leaves["delta"], mode, backend=backend).backward(grad_out)
        index = 1 if wanted == "h" else 2
        assert_close_to_reference(leaves[wanted].grad, ref[index], lowp[index], what=f"grad_{wanted} alone ({mode})")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_perturb_propagates_nan(target):
    backend, device = target
    h, labels, delta, grad_out = random_inputs(5, 3, (4, 6), (4, 6), device=device)
    h[2, 1, 3] = float("nan")
    check_perturb(backend, h, labels, delta, grad_out, "scale")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_class_grad_matches_reference(target, dtype, layout, mode):
    backend, device = target
    features, per_class = LAYOUTS[layout]
    h, labels, delta, grad_out = random_inputs(8, 4, features, per_class, dtype, device)
    ref = naive.class_grad(grad_out.double(), labels, 4, delta.shape, h=h.double(), mode=mode)
    assert not ref[3].any(), "test setup: class 3 must be absent from the batch"
    # Without delta the result is float32 (float32 accumulation, no low-precision rounding).
    got = class_grad(grad_out, labels, 4, delta.shape, h=h, mode=mode, backend=backend)
    assert got.dtype == torch.float32
    assert_close_to_reference(got, ref, what=f"class_grad ({backend}, {mode})")
    # With delta the result has delta's dtype.
    got = class_grad(grad_out, labels, 4, delta.shape, h=h, delta=delta, mode=mode, backend=backend)
    lowp = forward_backward(eager_perturb, h, labels, delta, grad_out, mode)[2]
    assert_close_to_reference(got, ref, lowp, what=f"class_grad with delta ({backend}, {mode})")
    assert not got[3].any(), "a class absent from the batch must get a zero gradient"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", TARGETS)
def test_class_grad_is_differentiable_on_every_backend(target, mode):
    """A class gradient autograd records (grad_out or h requiring grad) is the definition's, differentiable
    on every backend (the host and Triton kernels return results outside autograd: the graph was cut)."""
    backend, device = target
    h, labels, delta, grad_out = random_inputs(6, 3, (5,), (5,), torch.float64, device)
    grad_out.requires_grad_(True)
    h.requires_grad_(True)
    inputs = (grad_out, h) if mode == "scale" else (grad_out,)
    fn = lambda g, *rest: class_grad(g, labels, 3, delta.shape, h=rest[0] if rest else None, mode=mode,  # noqa: E731
                                      backend=backend)
    assert fn(*inputs).requires_grad
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_float64_delta_gets_its_gradient_summed_in_float64(target, mode):
    """float32 activations and a float64 delta: delta's gradient sums in float64 (the dtype rule: any float64
    operand), so 4096 samples of one class near 1000 keep float64 accuracy; add mode saves no delta, and its
    fast backward summed in float32 (relative error 5e-8)."""
    backend, device = target
    h = torch.randn(4096, 8, device=device)
    labels = torch.zeros(4096, dtype=torch.int64, device=device)
    grad_out = torch.rand(4096, 8, device=device) + 1000.0
    delta = torch.zeros(1, 8, dtype=torch.float64, device=device, requires_grad=True)
    perturb(h, labels, delta, mode, backend=backend).backward(grad_out)
    want = naive.class_grad(grad_out.double(), labels, 1, (1, 8), h=h.double(), mode=mode)
    assert_close_to_reference(delta.grad, want, what=f"grad_delta ({backend}, {mode})")
    got = class_grad(grad_out, labels, 1, (1, 8), h=h, delta=delta.detach(), mode=mode, backend=backend)
    assert_close_to_reference(got, want, what=f"class_grad ({backend}, {mode})")


def test_class_grad_under_vmap():
    """``torch.func.vmap`` over a batch of upstream gradients (every backend runs the definition there)."""
    labels = torch.tensor([0, 2, 1, 2])
    grads = torch.randn(3, 4, 5, dtype=torch.float64)
    got = torch.func.vmap(lambda g: class_grad(g, labels, 3, (3, 5), backend="reference"))(grads)
    want = torch.stack([naive.class_grad(g, labels, 3, (3, 5)) for g in grads])
    torch.testing.assert_close(got, want)


def reduction_chunk_plan(labels: torch.Tensor, num_classes: int, features, per_class, inner: int):
    """The Triton class reduction's ``_triton_common.chunk_plan`` for these labels on features ``F`` with a
    per-class delta ``P`` of run length ``inner`` (None: one program per class and feature block, no chunks)."""
    from lpa_kernels._common import class_order
    from lpa_kernels._triton_common import chunk_plan, reduction_tiling

    batch, D = labels.numel(), math.prod(per_class)
    block_d, block_q, _, R = reduction_tiling(batch, math.prod(features), D, inner)
    return chunk_plan(class_order(labels, num_classes)[1], R, batch * R, block_q, triton.cdiv(D, block_d))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["full", "channel", "last_dim"])
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_backward_with_a_dominant_class_split_across_programs(target, layout, mode):
    """Few classes and one of them large: the reduction runs in chunks (partial sums, then a fixed-
    order sum per class); the result must not change."""
    backend, device = target
    features, per_class = LAYOUTS[layout]
    labels = torch.tensor([0] * 50 + [1] * 3, device=device)[torch.randperm(53, device=device)]  # class 2 absent
    h, labels, delta, grad_out = random_inputs(53, 3, features, per_class, device=device, labels=labels)
    if backend == "triton":
        plan = reduction_chunk_plan(labels, 3, features, per_class, 5 * 7 if layout == "channel" else 1)
        assert plan is not None, "test setup: this problem should take the chunked path"
    check_perturb(backend, h, labels, delta, grad_out, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["full", "channel", "last_dim"])
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_backward_with_long_tailed_labels_splits_the_long_classes(target, layout, mode):
    """Enough classes to fill the device, but a long-tailed batch (class 0 holds most samples): the
    long classes are cut into chunks (partials, added by the last chunk to arrive) while the short
    ones write their sums directly, in one launch; the result must not change."""
    backend, device = target
    features, per_class = LAYOUTS[layout]
    counts = [120, 12, 4, 2, 1, 1, 1, 1, 1, 1]  # class 10 absent
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))[torch.randperm(144)].to(device)
    h, labels, delta, grad_out = random_inputs(144, 11, features, per_class, device=device, labels=labels)
    if backend == "triton":
        plan = reduction_chunk_plan(labels, 11, features, per_class, 5 * 7 if layout == "channel" else 1)
        assert plan is not None, "test setup: the long classes should be split"
        chunks = plan[2].diff()
        assert chunks[0] > 1 and (chunks == 1).any(), f"test setup: long and short classes, got chunks {chunks.tolist()}"
    check_perturb(backend, h, labels, delta, grad_out, mode)


# K = 10,000 classes, 7 samples of 4 classes (the last class id among them); the second shape has
# one number per class and enough rows per class that the reduction runs in chunks.
MANY_CLASSES = 10_000
FEW_PRESENT = [9999, 3, 4321, 3, 0, 9999, 3]


def absent_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` bool: True for the classes with no sample in ``labels``."""
    absent = torch.ones(num_classes, dtype=torch.bool, device=labels.device)
    absent[labels] = False
    return absent


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("features, per_class", [((13,), (13,)), ((5, 300), ())], ids=["D13", "D1_chunked"])
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_perturb_and_class_grad_with_far_more_classes_than_samples(target, features, per_class, mode):
    """The reductions cover only the classes present; every absent class gets an exact zero."""
    backend, device = target
    labels = torch.tensor(FEW_PRESENT, device=device)
    h, labels, delta, grad_out = random_inputs(7, MANY_CLASSES, features, per_class, device=device, labels=labels)
    check_perturb(backend, h, labels, delta, grad_out, mode)
    got = class_grad(grad_out, labels, MANY_CLASSES, delta.shape, h=h, mode=mode, backend=backend)
    ref = naive.class_grad(grad_out.double(), labels, MANY_CLASSES, delta.shape, h=h.double(), mode=mode)
    assert_close_to_reference(got, ref, what=f"class_grad K={MANY_CLASSES} ({backend}, {mode})")
    assert not got[absent_classes(labels, MANY_CLASSES)].any(), "classes absent from the batch must get an exactly zero gradient"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_class_grad_is_bitwise_reproducible(target, mode):
    backend, device = target
    h, labels, delta, grad_out = random_inputs(300, 3, (40,), (40,), device=device)
    first = class_grad(grad_out, labels, 3, delta.shape, h=h, mode=mode, backend=backend)
    # Nothing in the launch may be refused by PyTorch's deterministic mode, and the bits are the same.
    torch.use_deterministic_algorithms(True)
    try:
        second = class_grad(grad_out, labels, 3, delta.shape, h=h, mode=mode, backend=backend)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second), "class_grad gave different bits on the same input"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", [pytest.param(("reference", "cpu"), id="reference"), *KERNEL_TARGETS[:2]])  # Triton
def test_perturb_gradcheck_float64(target, mode):
    backend, device = target
    for per_class in ((2, 2, 3), (2, 1, 1)):  # full and channel-wise
        h, labels, delta, _ = random_inputs(3, 3, (2, 2, 3), per_class, torch.float64, device)
        inputs = (h.requires_grad_(), delta.requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: perturb(a, labels, b, mode, backend=backend), inputs)
        # double backward: with create_graph=True the fast backward runs the definition's ops
        assert torch.autograd.gradgradcheck(lambda a, b: perturb(a, labels, b, mode, backend=backend), inputs)


@pytest.mark.parametrize("target", TARGETS)
def test_add_mode_backward_does_not_read_delta(target):
    """add mode's gradients need only delta's shape: an in-place PGD step on delta between the forward and
    the backward (a pending backward over a carried delta) is fine on every backend, as in the definition."""
    backend, device = target
    h, labels, delta, _ = random_inputs(5, 3, (4,), (4,), torch.float32, device)
    h.requires_grad_()
    delta.requires_grad_()
    weights = torch.randn_like(h)
    (perturb(h, labels, delta, "add", backend=backend) * weights).sum().backward()
    expected = delta.grad.clone()
    delta.grad = None
    loss = (perturb(h, labels, delta, "add", backend=backend) * weights).sum()
    with torch.no_grad():
        delta.add_(1.0)
    loss.backward()
    torch.testing.assert_close(delta.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_opcheck_perturb_custom_ops(target, mode):
    backend, device = target
    h, labels, delta, grad_out = random_inputs(5, 3, (2, 7), (2, 1), device=device)
    # inner = 7: feature f of a (2, 7) sample reads delta[y, f // 7].
    torch.library.opcheck(torch.ops.lpa_kernels.perturb, (h.requires_grad_(), labels, delta.requires_grad_(), 7, mode, backend))
    for need_grad_h in (True, False):
        torch.library.opcheck(
            torch.ops.lpa_kernels.perturb_backward,
            (grad_out, h.detach(), labels, delta.detach(), [3, 2, 1], delta.dtype, 7, mode, backend, need_grad_h),
        )


@st.composite
def perturb_problems(draw):
    """A random feature shape, a random broadcastable delta shape, batch size, class count and mode."""
    features = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    keep = draw(st.lists(st.booleans(), min_size=len(features), max_size=len(features)))
    per_class = tuple(f if k else 1 for f, k in zip(features, keep))[draw(st.integers(0, len(features))):]
    return draw(st.integers(0, 6)), draw(st.integers(1, 5)), features, per_class, draw(st.sampled_from(MODES))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@settings(max_examples=20, deadline=None)
@given(problem=perturb_problems())
def test_perturb_random_shapes_match_reference(target, problem):
    backend, device = target
    batch, num_classes, features, per_class, mode = problem
    h, _, delta, grad_out = random_inputs(batch, num_classes, features, per_class, device=device)
    labels = make_labels(batch, num_classes, device)
    check_perturb(backend, h, labels, delta, grad_out, mode)


class _PerturbedHead(torch.nn.Module):
    """perturb -> linear head -> loss, plus the class gradient of that loss: both inside one graph."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.head = torch.nn.Linear(12, 3)

    def forward(self, h, labels, delta):
        out = perturb(h, labels, delta, "scale", backend=self.backend)
        grad_out = torch.ones_like(out)
        return self.head(out.flatten(1)).sum(), class_grad(grad_out, labels, 3, delta.shape, h=h, mode="scale", backend=self.backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=KERNEL_TARGETS[0].marks)])
def test_perturb_and_class_grad_under_torch_compile(backend):
    torch._dynamo.reset()
    model = _PerturbedHead(backend)
    h, labels, delta, _ = random_inputs(5, 3, (3, 4), (3, 1), labels=torch.tensor([0, 2, 2, 1, 0]))
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        delta_leaf = delta.clone().requires_grad_()
        loss, grad = run(h, labels, delta_leaf)
        loss.backward()
        results.append((loss.detach(), grad, delta_leaf.grad))
    for what, compiled, eager in zip(("loss", "class_grad", "delta.grad"), results[1], results[0]):
        torch.testing.assert_close(compiled, eager, msg=lambda m: f"compiled {what} differs from eager: {m}")
    compiled_grad = results[1][1]
    ref = naive.class_grad(torch.ones(5, 3, 4, dtype=torch.float64), labels, 3, delta.shape, h=h.double(), mode="scale")
    assert_close_to_reference(compiled_grad, ref, what=f"compiled class_grad ({backend})")


def long_tailed_labels(num_classes: int, imbalance: float, largest: int, device) -> torch.Tensor:
    """Shuffled labels with ``largest * imbalance ** (-c / (K - 1))`` samples of class c (at least 1)."""
    counts = [max(1, round(largest * imbalance ** (-c / (num_classes - 1)))) for c in range(num_classes)]
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    return labels[torch.randperm(labels.numel())].to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channel", "last_dim"])
def test_long_tailed_backward_is_bitwise_reproducible_on_gpu(layout):
    """Imbalance 100 over K = 100 classes: the long classes' chunks finish in any order on a GPU and
    the last to arrive adds their partials; five runs must agree bit for bit, and with the reference."""
    features, per_class = ((64, 14, 14), (64, 1, 1)) if layout == "channel" else ((4096,), (4096,))
    labels = long_tailed_labels(100, 100.0, 200, "cuda")
    h, labels, delta, grad_out = random_inputs(labels.numel(), 100, features, per_class, device="cuda", labels=labels)
    runs = [class_grad(grad_out, labels, 100, delta.shape, h=h, mode="scale", backend="triton") for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "class_grad differs between identical runs"
    ref = naive.class_grad(grad_out.double(), labels, 100, delta.shape, h=h.double(), mode="scale")
    assert_close_to_reference(runs[0], ref, what=f"long-tailed class_grad ({layout})")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_perturb_more_than_2_pow_31_elements(backend, mode):
    """Offsets past 2**31 elements: the last samples of a huge batch come out right."""
    features = 1024
    batch = 2**31 // features + 3
    h = torch.randn(batch, 4, 16, 16, device="cuda", dtype=torch.float16)
    labels = make_labels(batch, 5, "cuda")
    delta = torch.randn(5, 4, 1, 1, device="cuda", dtype=torch.float16)
    out = perturb(h, labels, delta, mode, backend=backend)
    tail = slice(batch - 3, batch)
    assert_close_to_reference(out[tail], naive.perturb(h[tail].double(), labels[tail], delta.double(), mode))
    del out
    grad = class_grad(h, labels, 5, delta.shape, h=h, mode=mode, backend=backend)
    ref = sum(naive.class_grad(h[i:i + 2**16].double(), labels[i:i + 2**16], 5, delta.shape, h=h[i:i + 2**16].double(), mode=mode)
              for i in range(0, batch, 2**16))
    assert_close_to_reference(grad, ref, what="class_grad over > 2**31 elements")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", TARGETS)
def test_samples_without_features(target, mode):
    """h (B, 3, 0) with a channel-wise delta (K, 3, 1): an empty h~, zero class gradients, and a fused step
    that leaves every class's delta as it is (the fast backends once divided by the empty feature size)."""
    backend, device = target
    h, labels = torch.randn(4, 3, 0, device=device, requires_grad=True), make_labels(4, 3, device)
    delta = torch.randn(3, 3, 1, device=device, requires_grad=True)
    out = perturb(h, labels, delta, mode, backend=backend)
    out.sum().backward()
    assert out.shape == h.shape and torch.equal(delta.grad, torch.zeros_like(delta))
    assert torch.equal(class_grad(out.detach(), labels, 3, (3, 3, 1), h=h.detach(), mode=mode, backend=backend),
                       torch.zeros(3, 3, 1, device=device))
    stepped = 3 * delta.detach().clone()
    before = stepped.clone()
    class_grad_pgd_step_(stepped, out.detach(), labels, 0.1, 0.5, 1.0, "linf", h=h.detach(), mode=mode, backend=backend)
    assert torch.equal(stepped, before), "a class with no gradient must keep its delta (no clamp)"
