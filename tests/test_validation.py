"""Bad input never reaches a kernel: each public op raises ValueError/TypeError naming the argument,
and a rejected in-place call leaves delta untouched."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import class_grad, class_grad_pgd_step_, head_pgd_, perturb, pgd_step_
from lpa_kernels._common import l2_iterate_eps
from lpa_kernels.pgd import naive

B, K = 4, 3
META = torch.device("meta")


def valid_args(op):
    """Keyword arguments of a call to ``op`` that is accepted (features (3, 5), channel-wise delta)."""
    h, grad_out = torch.randn(B, 3, 5), torch.randn(B, 3, 5)
    labels, delta = torch.tensor([0, 2, 1, 2]), torch.randn(K, 3, 1)
    if op is perturb:
        return dict(h=h, labels=labels, delta=delta, mode="scale")
    if op is class_grad:
        return dict(grad_out=grad_out, labels=labels, num_classes=K, delta_shape=(K, 3, 1), h=h, delta=delta, mode="scale")
    if op is pgd_step_:
        return dict(delta=delta, grad=torch.randn(K, 3, 1), step_size=0.1, eps=0.5, direction=1.0, norm="l2")
    return dict(delta=delta, grad_out=grad_out, labels=labels, step_size=0.1, eps=0.5, direction=1.0, norm="l2", h=h, mode="scale")


LABEL_CASES = [
    ("labels", torch.tensor([0, 1, -1, 2]), ValueError, r"labels must lie in \[0, 3\)"),
    ("labels", torch.tensor([0, 1, 3, 2]), ValueError, r"labels must lie in \[0, 3\)"),
    ("labels", torch.tensor([0.0, 1.0, 2.0, 1.0]), TypeError, "labels must be an int32 or int64 tensor"),
    ("labels", torch.tensor([0, 1, 2]), ValueError, r"labels must have shape \(4,\)"),
    ("labels", [0, 1, 2, 1], TypeError, "labels must be a torch.Tensor"),
]
COMMON_CASES = [
    ("backend", "fast", ValueError, "backend must be one of"),
    ("backend", None, TypeError, "backend must be one of"),
    ("backend", "cuda", ValueError, "backend='cuda' is not available"),
]
MODE_CASES = [("mode", "mul", ValueError, "mode must be one of 'add', 'scale'"),
              ("mode", None, TypeError, "mode must be one of 'add', 'scale'")]
PGD_CASES = [
    ("eps", 0.0, ValueError, "eps must be > 0"),
    ("eps", -1.0, ValueError, "eps must be > 0"),
    ("eps", torch.tensor([0.5, 0.0, 0.5]), ValueError, "eps must be > 0"),
    ("eps", torch.tensor([0.5, 0.5]), ValueError, r"eps must be a float or a tensor of shape \(3,\)"),
    ("step_size", -0.1, ValueError, "step_size must be >= 0"),
    ("direction", torch.tensor([1, -1, 1]), TypeError, "direction must be a float or a float"),
    ("direction", "up", TypeError, "direction must be a float"),
    ("norm", "l1", ValueError, "norm must be one of 'linf', 'l2'"),
    ("norm", 2, TypeError, "norm must be one of 'linf', 'l2'"),
    ("delta", torch.randn(K, 3, 1).long(), TypeError, "delta must be float16, bfloat16, float32 or float64"),
]

CASES = {
    perturb: LABEL_CASES + COMMON_CASES + MODE_CASES + [
        ("delta", torch.randn(K, 4, 1), ValueError, "delta must have shape"),
        ("delta", torch.randn(K, 2, 3, 5), ValueError, "delta must have shape"),
        ("delta", torch.randn(K, 3, 1, device=META), ValueError, "all tensors must be on one device"),
        ("h", torch.randint(0, 3, (B, 3, 5)), TypeError, "h must be float16"),
    ],
    class_grad: LABEL_CASES + COMMON_CASES + MODE_CASES + [
        ("delta_shape", (K, 4, 1), ValueError, "delta_shape must have shape"),
        ("delta_shape", (K + 1, 3, 1), ValueError, "delta_shape must start with num_classes=3"),
        ("num_classes", 0, ValueError, "num_classes must be an int >= 1"),
        ("num_classes", 3.0, TypeError, "num_classes must be an int >= 1, got float"),
        ("delta_shape", (K, 3.0, 1), TypeError, "delta_shape must be a tuple of ints"),
        ("delta_shape", "331", TypeError, "delta_shape must be a tuple of ints"),
        ("delta_shape", None, TypeError, "delta_shape must be a tuple of ints"),
        ("delta", torch.randn(K, 3, 5), ValueError, "delta must have shape delta_shape"),
        ("h", None, ValueError, "h is required for mode='scale'"),
        ("h", torch.randn(B, 3, 5, device=META), ValueError, "all tensors must be on one device"),
        ("grad_out", torch.randn(B, 3, 5).int(), TypeError, "grad_out must be float16"),
    ],
    pgd_step_: COMMON_CASES + PGD_CASES + [
        ("grad", torch.randn(K, 3, 5), ValueError, "grad must have the shape of delta"),
        ("grad", torch.randn(K, 3, 1, device=META), ValueError, "all tensors must be on one device"),
        ("grad", torch.randn(K, 3, 1).int(), TypeError, "grad must be float16"),
    ],
    class_grad_pgd_step_: LABEL_CASES + COMMON_CASES + MODE_CASES + PGD_CASES + [
        ("grad_out", torch.randn(B, 4, 5), ValueError, "delta must have shape"),
        ("grad_out", torch.randn(B, 3, 5, device=META), ValueError, "all tensors must be on one device"),
        ("h", None, ValueError, "h is required for mode='scale'"),
        ("h", torch.randn(B, 3, 4), ValueError, "h must have the shape of grad_out"),
    ],
}
PARAMS = [
    pytest.param(op, name, value, error, match, id=f"{op.__name__}-{name}-{i}")
    for op, cases in CASES.items()
    for i, (name, value, error, match) in enumerate(cases)
]


@pytest.mark.parametrize("op", list(CASES), ids=lambda op: op.__name__)
def test_valid_arguments_are_accepted(op):
    op(**valid_args(op), backend="reference")


@pytest.mark.parametrize("op, name, value, error, match", PARAMS)
def test_bad_argument_is_rejected_naming_it(op, name, value, error, match):
    args = valid_args(op)
    args[name] = value
    args.setdefault("backend", "reference")
    delta_before = args["delta"].clone() if op in (pgd_step_, class_grad_pgd_step_) else None
    with pytest.raises(error, match=match):
        op(**args)
    if delta_before is not None:
        assert torch.equal(args["delta"], delta_before), "a rejected in-place call must leave delta untouched"


def test_labels_are_checked_against_the_number_of_classes_of_delta():
    # 1000 classes in delta: label 999 is valid, 1000 is not.
    h, delta = torch.randn(2, 4), torch.randn(1000, 4)
    perturb(h, torch.tensor([0, 999]), delta, backend="reference")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\)"):
        perturb(h, torch.tensor([0, 1000]), delta, backend="reference")


# ----- hyperparameters must be finite, in range and on delta's device (issue 17) ------------------------
NAN, INF = float("nan"), float("inf")
HYPERPARAMETER_CASES = [
    ("step_size", INF, "step_size must be >= 0 and finite"),
    ("step_size", NAN, "step_size must be >= 0 and finite"),
    ("step_size", torch.tensor([0.1, INF, 0.1]), "step_size must be >= 0 and finite"),
    ("eps", INF, "eps must be > 0 and finite"),
    ("eps", NAN, "eps must be > 0 and finite"),
    ("eps", torch.tensor([0.5, NAN, 0.5]), "eps must be > 0 and finite"),
    ("direction", NAN, r"direction must be in \[-1.0, 1.0\] and finite"),
    ("direction", -INF, r"direction must be in \[-1.0, 1.0\] and finite"),
    ("direction", 1.5, r"direction must be in \[-1.0, 1.0\] and finite"),
    ("direction", torch.tensor([1.0, -1.0, -2.0]), r"direction must be in \[-1.0, 1.0\] and finite"),
    ("step_size", 1e39, r"step_size must be >= 0 and finite .* got 1e\+39 \(inf in torch.float32\)"),
    ("eps", 1e-300, r"eps must be > 0 and finite .* got 1e-300 \(0.0 in torch.float32\)"),
    ("eps", torch.tensor([0.5, 1e39, 0.5], dtype=torch.float64), "eps must be > 0 and finite"),
    ("step_size", torch.full((K,), 0.1, device=META), "step_size must be on delta's device cpu"),
    ("eps", torch.full((K,), 0.5, device=META), "eps must be on delta's device cpu"),
    ("direction", torch.ones(K, device=META), "direction must be on delta's device cpu"),
]
IN_PLACE_OPS = (pgd_step_, class_grad_pgd_step_)


@pytest.mark.parametrize("op", IN_PLACE_OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("name, value, match", HYPERPARAMETER_CASES, ids=lambda v: str(v)[:20])
def test_non_finite_or_out_of_range_hyperparameter_is_rejected_before_delta_changes(op, name, value, match):
    args = valid_args(op)
    args[name] = value
    delta_before = args["delta"].clone()
    with pytest.raises(ValueError, match=match):
        op(**args, backend="reference")
    assert torch.equal(args["delta"], delta_before)


@pytest.mark.parametrize("direction", [-1.0, -0.25, 0.0, 1.0, torch.tensor([1.0, 0.5, -1.0])], ids=str)
def test_direction_is_a_multiplier_of_the_step_in_minus_one_to_one(direction):
    """direction in [-1, 1] scales the step: 0.5 moves half as far as 1, -1 the other way."""
    delta, grad = torch.zeros(K, 4, dtype=torch.float64), torch.randn(K, 4, dtype=torch.float64)
    pgd_step_(delta, grad, 0.1, 10.0, direction, "l2", backend="reference")
    multiplier = torch.as_tensor(direction, dtype=torch.float64).expand(K)
    expected = 0.1 * multiplier[:, None] * grad / grad.norm(dim=1, keepdim=True)
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_grad_is_not_rounded_to_delta_dtype_before_the_step(delta_dtype):
    """The rule: float64 arithmetic when delta or grad is float64, else float32; rounded into delta once."""
    delta, grad = torch.randn(K, 6).to(delta_dtype), torch.randn(K, 6, dtype=torch.float64)
    grad[0] *= 1e300  # finite in float64; rounded to float32 first, class 0 would step along sign(grad[0])
    expected = delta.double().clone()
    step, eps, direction = torch.tensor([[0.3] * K, [1.0] * K, [1.0] * K], dtype=torch.float64)
    # projected inside eps by delta's dtype's margin, as a float64 iterate rounded into that delta is
    naive.pgd_step_(expected, grad, step, l2_iterate_eps(eps, delta_dtype, torch.float64, "l2"), direction, "l2")
    got = pgd_step_(delta.clone(), grad, 0.3, 1.0, 1.0, "l2", backend="reference")
    assert got.dtype == delta_dtype
    # step_size and eps are taken in delta's compute dtype (float32): equal up to 2 ulps of delta's dtype
    torch.testing.assert_close(got, expected.to(delta_dtype), rtol=2 * torch.finfo(delta_dtype).eps, atol=0)


# ----- in-place ops refuse aliased arguments and tracked deltas (issue 17) --------------------------------
def test_pgd_step_refuses_a_grad_or_hyperparameter_sharing_memory_with_delta():
    storage = torch.rand(2 * K * 3) + 0.5
    delta = storage[: K * 3].view(K, 3, 1)
    cases = [
        ("grad", delta),                                 # the same tensor
        ("grad", storage[1: K * 3 + 1].view(K, 3, 1)),   # overlapping by all but one element
        ("eps", storage[K * 3 - 1: K * 4 - 1]),          # a hyperparameter overlapping delta's last element
        ("step_size", storage[:K]),
    ]
    for name, alias in cases:
        args = dict(valid_args(pgd_step_), delta=delta)
        args[name] = alias
        before = storage.clone()
        with pytest.raises(ValueError, match=f"delta and {name} share memory"):
            pgd_step_(**args, backend="reference")
        assert torch.equal(storage, before)
    # a disjoint part of the same buffer is fine
    pgd_step_(delta, storage[K * 3:].view(K, 3, 1), 0.1, 0.5, 1.0, "l2", backend="reference")


@pytest.mark.parametrize("name", ["grad_out", "h"])
def test_class_grad_pgd_step_refuses_inputs_sharing_memory_with_delta(name):
    args = valid_args(class_grad_pgd_step_)
    args["delta"] = args[name][:K, :, :1]
    before = args[name].clone()
    with pytest.raises(ValueError, match=f"delta and {name} share memory"):
        class_grad_pgd_step_(**args, backend="reference")
    assert torch.equal(args[name], before)


def test_head_pgd_refuses_delta_aliasing_the_weights():
    """``head_pgd_(h, y, W, b, delta=W)`` would overwrite the classifier's weights."""

    h, labels, weight, bias = torch.randn(B, 5), torch.tensor([0, 2, 1, 2]), torch.randn(K, 5), torch.randn(K)
    before = weight.clone()
    for name, delta in (("weight", weight), ("h", h[:K])):
        with pytest.raises(ValueError, match=f"delta and {name} share memory"):
            head_pgd_(h, labels, weight, bias, delta, 2, 0.1, 0.5, backend="reference")
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", IN_PLACE_OPS, ids=lambda op: op.__name__)
def test_delta_requiring_grad_is_refused_in_grad_mode_and_updated_under_no_grad(op):
    args = valid_args(op)
    delta = torch.nn.Parameter(args["delta"].clone())
    args["delta"] = delta
    before = delta.detach().clone()
    with pytest.raises(ValueError, match="delta requires grad"):
        op(**args, backend="reference")
    assert torch.equal(delta.detach(), before)
    with torch.no_grad():
        op(**args, backend="reference")
    assert not torch.equal(delta.detach(), before), "under no_grad the update must happen"


@pytest.mark.parametrize("steps, error", [(-1, ValueError), ("2", TypeError), (2.0, TypeError), (True, TypeError)],
                         ids=str)
def test_head_pgd_steps_must_be_a_non_negative_int(steps, error):
    h, labels, weight, bias, delta = torch.randn(B, 5), torch.tensor([0, 2, 1, 2]), torch.randn(K, 5), None, torch.zeros(K, 5)
    with pytest.raises(error, match="steps must be an int >= 0"):
        head_pgd_(h, labels, weight, bias, delta, steps, 0.1, 0.5, backend="reference")
    assert not delta.any()


def test_a_float64_delta_takes_hyperparameters_beyond_float32():
    delta = torch.zeros(K, 3, dtype=torch.float64)
    pgd_step_(delta, torch.ones(K, 3, dtype=torch.float64), 1e-300, 1e39, 1.0, "linf", backend="reference")
    assert torch.all(delta == 1e-300)


@pytest.mark.parametrize("op", IN_PLACE_OPS, ids=lambda op: op.__name__)
def test_in_place_ops_refuse_a_delta_pytorch_would_not_update(op):
    args = valid_args(op)
    args["delta"] = torch.randn(1, 3, 1).expand(K, 3, 1)
    with pytest.raises(ValueError, match="delta has elements that share memory"):
        op(**args, backend="reference")
    with torch.inference_mode():
        inference = torch.randn(K, 3, 1)
    args["delta"] = inference
    before = inference.clone()
    with pytest.raises(ValueError, match="delta is an inference tensor"):
        op(**args, backend="reference")
    assert torch.equal(inference, before)
    with torch.inference_mode():
        op(**args, backend="reference")  # inside inference mode PyTorch updates it too
    assert not torch.equal(inference, before)


def test_meta_tensors_are_checked_for_shape_only():
    labels = torch.zeros(B, dtype=torch.int64, device=META)
    out = perturb(torch.randn(B, 3, 5, device=META), labels, torch.randn(K, 3, 1, device=META), backend="reference")
    assert out.shape == (B, 3, 5) and out.device == META


def test_compiled_ops_assert_the_values_they_cannot_read():
    """Inside torch.compile the host reads become in-graph assertions: a RuntimeError with the same
    message, before delta changes (eager raises the ValueError)."""
    args = valid_args(perturb)
    compiled = torch.compile(lambda h, y, d: perturb(h, y, d, backend="reference"), fullgraph=True)
    assert torch.equal(compiled(args["h"], args["labels"], args["delta"]),
                       perturb(args["h"], args["labels"], args["delta"], backend="reference"))
    for bad in (torch.tensor([0, 1, -1, 2]), torch.tensor([0, 1, 3, 2])):
        with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 3\)"):
            compiled(args["h"], bad, args["delta"])
    step = torch.compile(lambda d, g, e: pgd_step_(d, g, 0.1, e, backend="reference"), fullgraph=True)
    delta, grad = torch.zeros(K, 3), torch.ones(K, 3)
    for eps in (torch.tensor([0.5, float("nan"), 0.5]), torch.tensor([0.5, -1.0, 0.5])):
        with torch.no_grad(), pytest.raises(RuntimeError, match="eps must be > 0"):
            step(delta, grad, eps)
        assert not delta.any(), "a refused compiled call changed delta"
    with torch.no_grad():
        step(delta, grad, torch.full((K,), 0.5))
    assert torch.allclose(delta, torch.full((K, 3), 0.1))
