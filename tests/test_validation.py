"""Bad input never reaches a kernel: each public op raises ValueError/TypeError naming the argument,
and a rejected in-place call leaves delta untouched."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import class_grad, class_grad_pgd_step_, perturb, pgd_step_

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
    ("backend", "cuda", ValueError, "backend='cuda' is not available"),
]
MODE_CASES = [("mode", "mul", ValueError, "mode must be one of 'add', 'scale'")]
PGD_CASES = [
    ("eps", 0.0, ValueError, "eps must be > 0"),
    ("eps", -1.0, ValueError, "eps must be > 0"),
    ("eps", torch.tensor([0.5, 0.0, 0.5]), ValueError, "eps must be > 0"),
    ("eps", torch.tensor([0.5, 0.5]), ValueError, r"eps must be a float or a tensor of shape \(3,\)"),
    ("step_size", -0.1, ValueError, "step_size must be >= 0"),
    ("direction", torch.tensor([1, -1, 1]), TypeError, "direction must be a float or a float"),
    ("direction", "up", TypeError, "direction must be a float"),
    ("norm", "l1", ValueError, "norm must be one of 'linf', 'l2'"),
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
        ("num_classes", 0, ValueError, "num_classes must be a positive int"),
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
