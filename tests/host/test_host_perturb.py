"""``perturb`` and ``class_grad`` on the reference backend's two CPU paths (the host C++ kernels and the
PyTorch ops, the ``reference_path`` fixture) against their definition ``perturb/naive.py``: the float64
definition is the truth, the definition in the tested dtype sets the tolerance (``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import _host_ext, class_grad, perturb
from lpa_kernels.perturb import naive
from lpa_kernels.perturb.op import run_perturb
from tests.helpers import assert_close_to_reference

DTYPES = (torch.float32, torch.float64)
# (B, F, P, K): full, last-dim and channel layouts, one value per class, absent classes (K above B)
SHAPES = [
    pytest.param(0, (33,), (33,), 7, id="B0"),
    pytest.param(1, (33,), (33,), 7, id="B1-full"),
    pytest.param(37, (130,), (130,), 7, id="B37-F130-full"),
    pytest.param(37, (1,), (1,), 1, id="F1-K1"),
    pytest.param(37, (3, 4, 5), (3, 4, 5), 7, id="4d-full"),
    pytest.param(37, (3, 4, 5), (3, 1, 1), 7, id="4d-channel"),
    pytest.param(37, (3, 4, 5), (1, 1, 5), 1, id="4d-last"),
    pytest.param(5, (2, 11), (11,), 7, id="last-short-P"),
    pytest.param(6, (4, 3), (), 7, id="one-value-per-class"),
]


def problem(batch, features, per_class, classes, dtype, label_dtype):
    h = torch.randn(batch, *features, dtype=dtype)
    delta = 0.5 * torch.randn(classes, *per_class, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), dtype=label_dtype)
    return h, labels, delta


def values_and_grads(fn, h, labels, delta, grad_out, mode):
    """``fn(h, labels, delta, mode)`` and its gradients w.r.t. ``h`` and ``delta`` for ``grad_out``."""
    h, delta = h.detach().requires_grad_(), delta.detach().requires_grad_()
    out = fn(h, labels, delta, mode)
    return (out, *torch.autograd.grad(out, (h, delta), grad_out))


def definition(h, labels, delta, grad_out, mode):
    """``(truth in float64, PyTorch's own result in the tested dtype)`` of ``values_and_grads``."""
    truth = values_and_grads(naive.perturb, h.double(), labels, delta.double(), grad_out.double(), mode)
    return truth, values_and_grads(naive.perturb, h, labels, delta, grad_out, mode)


def reference(h, labels, delta, mode):
    return perturb(h, labels, delta, mode, backend="reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("batch, features, per_class, classes", SHAPES)
def test_forward_and_backward_match_the_definition(reference_path, dtype, label_dtype, mode, batch, features,
                                                    per_class, classes):
    h, labels, delta = problem(batch, features, per_class, classes, dtype, label_dtype)
    grad_out = torch.randn_like(h)
    got = values_and_grads(reference, h, labels, delta, grad_out, mode)
    truth, lowp = definition(h, labels, delta, grad_out, mode)
    for name, g, t, low in zip(["h~", "grad_h", "grad_delta"], got, truth, lowp):
        assert g.dtype == dtype
        assert_close_to_reference(g, t, low, what=f"{name} {mode} P={per_class}")
    if reference_path.name == "host":
        assert reference_path.calls.count("perturb_class_grad") == 1


def test_absent_classes_get_exact_zero_gradient(reference_path):
    h, delta = torch.randn(6, 9), torch.randn(5, 9, requires_grad=True)
    labels = torch.tensor([1, 3, 3, 1, 1, 3])
    out = perturb(h, labels, delta, "scale", backend="reference")
    (grad,) = torch.autograd.grad(out, delta, torch.randn_like(out))
    assert torch.equal(grad[[0, 2, 4]], torch.zeros(3, 9))
    assert grad[[1, 3]].abs().min() > 0


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("wrt", ["h", "delta", "both"])
def test_gradient_of_either_input_alone(reference_path, mode, wrt):
    h, labels, delta = problem(37, (3, 4, 5), (3, 1, 1), 7, torch.float64, torch.int64)
    grad_out = torch.randn_like(h)
    truth = values_and_grads(naive.perturb, h, labels, delta, grad_out, mode)
    h.requires_grad_(wrt in ("h", "both"))
    delta.requires_grad_(wrt in ("delta", "both"))
    out = perturb(h, labels, delta, mode, backend="reference")
    out.backward(grad_out)
    assert_close_to_reference(out, truth[0], what="h~")
    for x, expected in [(h, truth[1]), (delta, truth[2])]:
        if x.requires_grad:
            assert_close_to_reference(x.grad, expected, what="gradient")
        else:
            assert x.grad is None
    if reference_path.name == "host":  # only h's gradient: naive's ops (C++ autograd nodes) run
        kernels = [name for name in reference_path.calls if name != "label_range"]  # the public op's label check
        assert kernels[:1] == ([] if wrt == "h" else ["perturb_forward"])
        assert ("perturb_class_grad" in reference_path.calls) == (wrt != "h")
    with torch.no_grad():  # no gradient: the forward kernel alone
        assert_close_to_reference(perturb(h, labels, delta, mode, backend="reference"), truth[0], what="h~")


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("per_class", [(3, 4, 5), (3, 1, 1), (5,)], ids=["full", "channel", "last"])
def test_gradcheck_float64(reference_path, mode, per_class):
    h = torch.randn(9, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, *per_class, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0, 0, 2, 1, 2], dtype=torch.int32)  # class 3 absent
    assert torch.autograd.gradcheck(lambda h, d: perturb(h, labels, d, mode, backend="reference"), (h, delta))


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_double_backward(reference_path, mode):
    """With ``create_graph=True`` the backward runs ``naive``'s ops, which autograd differentiates again."""
    h, labels, delta = problem(8, (6,), (6,), 3, torch.float64, torch.int64)
    weights = torch.randn_like(h)

    def second_derivatives(fn):
        x, d = h.clone().requires_grad_(), delta.clone().requires_grad_()
        out = fn(x, labels, d, mode)
        grad_h, grad_delta = torch.autograd.grad(out, (x, d), out * weights, create_graph=True)
        return torch.autograd.grad((grad_h * grad_h).sum() + grad_delta.sum(), (x, d))

    for got, expected in zip(second_derivatives(reference), second_derivatives(naive.perturb)):
        assert_close_to_reference(got, expected, what="second derivative")


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_strided_gradient_and_non_contiguous_inputs(reference_path, mode):
    """A stride-0 ``grad_out`` (the gradient of ``sum``) is made contiguous for the kernels; a transposed
    ``h`` or ``delta`` is refused by them (the PyTorch ops run): the results match the definition."""
    h, labels, delta = problem(11, (7,), (7,), 3, torch.float32, torch.int64)
    for h_in, delta_in in [(h, delta), (h.t().contiguous().t(), delta), (h, delta.t().contiguous().t())]:
        h_in, delta_in = h_in.detach().requires_grad_(), delta_in.detach().requires_grad_()
        perturb(h_in, labels, delta_in, mode, backend="reference").sum().backward()
        truth = values_and_grads(naive.perturb, h.double(), labels, delta.double(), torch.ones(11, 7,
                                                                                                 dtype=torch.float64),
                                 mode)
        assert_close_to_reference(h_in.grad, truth[1], what="grad_h")
        assert_close_to_reference(delta_in.grad, truth[2], what="grad_delta")
    if reference_path.name == "host":
        assert reference_path.calls.count("perturb_forward") == 1 + (mode == "scale")


@pytest.mark.parametrize("case", ["mixed dtypes", "float16", "int16 labels", "non-contiguous h", "unserved layout"])
def test_what_the_kernels_do_not_serve_runs_the_pytorch_ops(case):
    h, labels, delta = torch.randn(6, 4, 3), torch.tensor([0, 1, 2, 1, 0, 2]), torch.randn(3, 4, 3)
    if case == "mixed dtypes":
        delta = delta.double()
    elif case == "float16":
        h, delta = h.half(), delta.half()
    elif case == "int16 labels":
        labels = labels.to(torch.int16)
    elif case == "non-contiguous h":
        h = torch.randn(6, 3, 4).transpose(1, 2)
    else:  # a (4, 1, 3) delta broadcast over a (4, 2, 3) sample: no single stride describes it
        h, delta = torch.randn(6, 4, 2, 3), torch.randn(3, 4, 1, 3)
    delta.requires_grad_()
    if case == "int16 labels":
        with pytest.raises(TypeError, match="labels"):
            perturb(h, labels, delta, backend="reference")
        return
    out = perturb(h, labels, delta, "scale", backend="reference")
    assert type(out.grad_fn).__name__ != "_HostPerturbBackward"
    torch.testing.assert_close(out, naive.perturb(h, labels, delta.detach(), "scale"))


def test_compile_traces_the_pytorch_ops(reference_path):
    """``torch.compile`` sees ``naive.perturb``: no host kernel runs while it traces or in the compiled code."""
    h, labels, delta = problem(5, (4,), (4,), 3, torch.float32, torch.int64)
    compiled = torch.compile(lambda h, d: perturb(h, labels, d, "add", backend="reference"), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(h, delta), naive.perturb(h, labels, delta, "add"))
    assert not reference_path.calls
    perturb(h, labels, delta, "add", backend="reference")  # the eager call does use them (the fixture checks it)


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("per_class", [(3, 4, 5), (3, 1, 1), (1, 1, 5), (3, 1, 5)], ids=["full", "channel", "last",
                                                                                          "unserved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_grad_matches_the_definition(reference_path, mode, per_class, dtype):
    grad_out, labels, _ = problem(37, (3, 4, 5), per_class, 7, dtype, torch.int32)
    h = torch.randn_like(grad_out)
    delta_shape = (7, *per_class)
    got = class_grad(grad_out, labels, 7, delta_shape, h=h, mode=mode, backend="reference")
    truth = naive.class_grad(grad_out.double(), labels, 7, delta_shape, h=h.double(), mode=mode)
    lowp = naive.class_grad(grad_out, labels, 7, delta_shape, h=h, mode=mode)
    assert got.dtype == dtype
    assert_close_to_reference(got, truth, lowp, what=f"class_grad {mode} P={per_class}")
    if per_class == (3, 1, 5):  # delta_layout refuses it: this test runs the kernels on the full layout once
        perturb(grad_out, labels, torch.zeros(7, 3, 4, 5, dtype=dtype), backend="reference")


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("shape", [((40, 4096), (1,)), ((8, 3, 64, 64), (3, 1, 1))], ids=["one-value", "channel"])
def test_long_float32_class_sums_keep_the_definitions_accuracy(reference_path, shape, mode):
    """One class summing ~160,000 (or ~100,000 per channel) float32 terms: the host kernel summed them one by
    one in float32 (15-35x the definition's error, whose sums are pairwise); it sums in double now."""
    (batch, *features), per_class = shape
    torch.manual_seed(0)
    grad_out, h = torch.randn(batch, *features), torch.randn(batch, *features)
    labels, delta_shape = torch.zeros(batch, dtype=torch.int64), (2, *per_class)
    got = class_grad(grad_out, labels, 2, delta_shape, h=h, mode=mode, backend="reference")
    truth = naive.class_grad(grad_out.double(), labels, 2, delta_shape, h=h.double(), mode=mode)
    lowp = naive.class_grad(grad_out, labels, 2, delta_shape, h=h, mode=mode)
    # the rule itself (at most twice PyTorch's own error): the tolerance's relative floor would hide it here
    error, own_error = ((t.double() - truth).abs().max().item() for t in (got, lowp))
    assert error <= 2 * own_error, f"class_grad {mode} P={per_class}: error {error:.2e}, PyTorch's {own_error:.2e}"


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_delta_gradient_scale_of_the_training_entry(reference_path, mode):
    """``run_perturb``'s ``delta_grad_scale`` (the single-pass site's batch size) multiplies delta's
    gradient only, on every path."""
    h, labels, delta = problem(13, (6,), (6,), 4, torch.float64, torch.int64)
    grad_out = torch.randn_like(h)
    truth = values_and_grads(naive.perturb, h, labels, delta, grad_out, mode)
    got = values_and_grads(lambda *a: run_perturb(*a, "reference", None, 13), h, labels, delta, grad_out, mode)
    assert_close_to_reference(got[0], truth[0], what="h~")
    assert_close_to_reference(got[1], truth[1], what="grad_h")
    assert_close_to_reference(got[2], 13 * truth[2], what="grad_delta")


@pytest.mark.parametrize("args, message", [
    ((0, 8, 2, 5, 2, 1), "multiple of D"),  # F = 5 features are no whole repeats of D = 2 blocks
    ((0, 8, 2, 4, 0, 1), "multiple of D"),
    ((0, 2, 2, 4, 2, 1), "label_bytes"),
    ((3, 8, 2, 4, 2, 1), "dtype code"),
])
def test_the_bindings_refuse_inconsistent_sizes_before_touching_memory(args, message):
    """Null pointers: a binding that did not refuse would crash the process."""
    module, error = _host_ext._load()
    assert module is not None, error
    dtype, label_bytes, batch, features, per_class, inner = args
    with pytest.raises(ValueError, match=message):
        module.perturb_forward(dtype, label_bytes, 0, 0, 0, 0, batch, features, per_class, inner, False)
    with pytest.raises(ValueError, match=message):
        module.perturb_class_grad(dtype, label_bytes, 0, 0, 0, 0, batch, features, 3, per_class, inner, False, 1.0)
