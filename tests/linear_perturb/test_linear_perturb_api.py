"""linear_perturb's custom ops and integration: opcheck, torch.compile, autocast, input validation."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import linear_perturb
from lpa_kernels.linear_perturb import naive
from lpa_kernels.linear_perturb.op import _linear_perturb_backward_op, _linear_perturb_op
from tests.helpers import KERNEL_TARGETS, assert_close_to_reference, make_labels
from tests.linear_perturb.test_linear_perturb import eager_chain, make_inputs

TRITON_INTERP = KERNEL_TARGETS[0]  # the custom ops' CPU path: the Triton interpreter


@pytest.mark.parametrize("target", [TRITON_INTERP])
@pytest.mark.parametrize("activation,mode,save_preact", [
    ("gelu", "scale", True), ("relu", "add", True), ("none", "add", False),
])
def test_opcheck_forward_op(target, activation, mode, save_preact):
    backend, device = target
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (6, 7), 5, 3)
    for t in (x, weight, bias, delta):
        t.requires_grad_(save_preact)  # the backward needs the pre-activation, except for none/add
    options = (activation, mode, save_preact, backend)
    torch.library.opcheck(_linear_perturb_op, (x, weight, bias, labels, delta, 1, *options))
    # Without bias, as 3 samples of 2 rows each.
    torch.library.opcheck(_linear_perturb_op, (x.detach(), weight.detach(), None, labels[:3], delta.detach(), 2, *options))


@pytest.mark.parametrize("target", [TRITON_INTERP])
def test_opcheck_backward_op(target):
    backend, device = target
    grad_out, preact = torch.randn(6, 5, device=device), torch.randn(6, 5, device=device)
    labels, delta = make_labels(3, 4, device), torch.randn(4, 5, device=device)
    torch.library.opcheck(_linear_perturb_backward_op, (grad_out, preact, labels, delta, 2, "silu", "scale", backend))


class TinyHead(torch.nn.Module):
    def __init__(self, in_features=6, out_features=5, classes=3, backend="reference"):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)
        self.delta = torch.nn.Parameter(0.1 * torch.randn(classes, out_features))
        self.backend = backend

    def forward(self, x, labels):
        return linear_perturb(x, self.linear.weight, self.linear.bias, labels, self.delta, "gelu", "scale", self.backend).sum()


def _compiled_matches_eager(module, compile_backend, x_shape):
    x, labels = torch.randn(x_shape), make_labels(x_shape[0], 3)
    eager_loss = module(x, labels)
    eager_grads = torch.autograd.grad(eager_loss, list(module.parameters()))
    compiled = torch.compile(module, fullgraph=True, backend=compile_backend)
    loss = compiled(x, labels)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    torch.testing.assert_close(loss, eager_loss, msg="compiled loss differs from eager")
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, msg="compiled gradient differs from eager")


def test_compile_fullgraph_reference_backend():
    torch._dynamo.reset()
    _compiled_matches_eager(TinyHead(backend="reference"), "inductor", (4, 3, 6))


@pytest.mark.parametrize("target", [TRITON_INTERP])
def test_compile_fullgraph_custom_op(target):
    """The fast path traces as one opaque op (fake impls, registered autograd) without graph breaks."""
    torch._dynamo.reset()
    _compiled_matches_eager(TinyHead(backend=target[0]), "aot_eager", (4, 3, 6))


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_autocast_casts_like_linear(target):
    """Inside autocast x, weight and bias are cast to the autocast dtype (as F.linear casts them), the
    result has that dtype, and the float32 parameters get float32 gradients."""
    backend, device = target
    dtype = torch.bfloat16
    x, weight, bias, labels, delta = make_inputs(torch.float32, device, (9, 2, 11), 13, 3)
    leaves = [t.requires_grad_() for t in (x, weight, bias, delta)]
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        out = linear_perturb(x, weight, bias, labels, delta, "silu", "add", backend=backend)
        lowp = eager_chain(x.cpu(), weight.cpu(), bias.cpu(), labels.cpu(), delta.cpu(), "silu", "add")
    assert out.dtype == dtype, f"autocast output dtype {out.dtype}, expected {dtype}"
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(g.dtype == torch.float32 for g in grads), "float32 parameters must get float32 gradients"
    rounded = [t.detach().cpu().to(dtype).double() for t in (x, weight, bias)]
    reference = naive.linear_perturb(*rounded, labels.cpu(), delta.detach().cpu().double(), "silu", "add")
    assert_close_to_reference(out, reference, lowp=lowp.to(dtype), what="autocast output")


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("change,argname", [
    (dict(weight=torch.randn(5, 8)), "weight"),
    (dict(delta=torch.randn(3, 6)), "delta"),
    (dict(delta=torch.randn(5)), "delta"),
    (dict(bias=torch.randn(4)), "bias"),
    (dict(activation="tanh"), "activation"),
    (dict(mode="mul"), "mode"),
    (dict(labels=torch.tensor([0, 1, 3, 0])), "labels"),
    (dict(x=torch.randn(4)), "x"),
], ids=["weight-in", "delta-out", "delta-rank", "bias", "activation", "mode", "label-range", "x-rank"])
def test_bad_input_raises_value_error_naming_argument(target, change, argname):
    backend, device = target
    args = dict(x=torch.randn(4, 7), weight=torch.randn(5, 7), bias=torch.randn(5), labels=torch.tensor([0, 1, 2, 0]),
                delta=torch.randn(3, 5), activation="relu", mode="add")
    args.update(change)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=argname):
        linear_perturb(**args, backend=backend)
