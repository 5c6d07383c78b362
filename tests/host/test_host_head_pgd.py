"""``head_pgd_`` on the reference backend's two CPU paths (the host C++ kernel and the PyTorch ops, the
``reference_path`` fixture) against its definition ``head_pgd/naive.py``: the float64 definition is the
truth, the definition in the tested dtype sets the tolerance (``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import head_pgd_
from lpa_kernels.head_pgd import loop
from tests.head_pgd.test_head_pgd import definition
from tests.helpers import assert_close_to_reference

DTYPES = (torch.float32, torch.float64)
# (B, K, D, labels): None draws B labels over K classes (most of the small batches leave classes absent)
SHAPES = [
    pytest.param(0, 3, 5, None, id="B0"),
    pytest.param(1, 1, 7, None, id="B1-K1"),
    pytest.param(1, 4, 7, None, id="B1-K4"),
    pytest.param(37, 5, 13, None, id="B37-K5"),
    pytest.param(64, 10, 33, None, id="B64-K10"),
    pytest.param(5, 12, 9, None, id="K-above-B"),
    pytest.param(9, 4, 6, [2] * 9, id="one-class"),
]


def problem(batch, classes, features, labels, dtype, label_dtype=torch.int64, bias=True):
    """Random ``(h, labels, weight, bias, delta)`` with a carried (non-zero) delta and logits of order one."""
    h = torch.randn(batch, features, dtype=dtype)
    y = torch.randint(0, classes, (batch,)) if labels is None else torch.tensor(labels)
    weight = torch.randn(classes, features, dtype=dtype) / features**0.5
    b = torch.randn(classes, dtype=dtype) if bias else None
    return h, y.to(label_dtype), weight, b, 0.05 * torch.randn(classes, features, dtype=dtype)


def direction_of(kind, classes, dtype):
    if kind == "per-class":  # every sign and 0, some shortened steps
        return torch.tensor([1.0, -1.0, 0.0, 0.5, -0.25])[torch.arange(classes) % 5].to(dtype)
    return kind


def check(h, y, weight, bias, delta, steps, step_size, eps, direction, norm, mode):
    """Runs the reference backend on ``delta`` in place and compares it with the definition."""
    start = delta.clone()
    got = head_pgd_(h, y, weight, bias, delta, steps, step_size, eps, direction, norm, mode, backend="reference")
    assert got is delta
    double = lambda t: t.double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    ref64 = start.double()
    definition(double(h), y, double(weight), double(bias), ref64, steps, double(step_size), double(eps),
               double(direction), norm, mode)
    lowp = start.clone()
    definition(h, y, weight, bias, lowp, steps, step_size, eps, direction, norm, mode)
    assert_close_to_reference(delta, ref64, lowp, what=f"delta after {steps} {norm} {mode} steps ({direction!r})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, classes, features, labels", SHAPES)
@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("direction", [0.7, "per-class", "confidence"])
def test_matches_the_definition(reference_path, dtype, batch, classes, features, labels, mode, norm, direction):
    """Odd sizes, K = 1, B = 0 and 1, absent classes, one repeated label; int32 labels and no bias for
    float64 (int64 and a bias for float32); per-class step sizes."""
    h, y, w, b, delta = problem(batch, classes, features, labels, dtype, *(
        (torch.int32, False) if dtype == torch.float64 else (torch.int64, True)))
    step = torch.linspace(0.05, 0.2, classes, dtype=dtype)
    check(h, y, w, b, delta, 3, step, 0.3, direction_of(direction, classes, dtype), norm, mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("class_space", [True, False], ids=["class-space", "rows"])
@pytest.mark.parametrize("direction", [-1.0, "confidence"])
def test_both_add_formulations(reference_path, dtype, class_space, direction, monkeypatch):
    """add mode in the class-space algebra and in the per-sample form, whichever the FLOP rule picks."""
    monkeypatch.setattr(loop, "use_class_space", lambda *args: class_space)
    check(*problem(67, 6, 29, None, dtype), 4, 0.1, 0.3, direction, "l2", "add")


@pytest.mark.parametrize("mode", ["add", "scale"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("direction", [1.0, "confidence"])
def test_non_finite_activations_propagate_as_in_the_definition(reference_path, mode, norm, direction):
    """A NaN and an Inf sample: NaN reaches the deltas the definition makes NaN, and only those; the
    confidence rule counts their classes as absent (direction 0)."""
    h, y, w, b, delta = problem(23, 4, 11, [0, 1, 2, 3] * 5 + [0, 1, 2], torch.float32)
    h[3, 2], h[6, 0] = float("nan"), float("inf")
    check(h, y, w, b, delta, 2, 0.1, 0.3, direction, norm, mode)


@pytest.mark.parametrize("steps", [0, 1])
def test_zero_weights_leave_delta_unchanged(reference_path, steps):
    """All-zero weights give an all-zero class gradient (delta kept, projection included) or no step."""
    h, y, w, b, delta = problem(8, 3, 5, None, torch.float32)
    delta *= 100  # outside eps: a projection would move it
    before = delta.clone()
    head_pgd_(h, y, torch.zeros_like(w), b, delta, steps, 0.1, 0.3, 1.0, "l2", "add", backend="reference")
    assert torch.equal(delta, before)


@pytest.mark.parametrize("ok", [None, True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_guard_keeps_non_finite_classes_and_counts_them(reference_path, ok, dtype):
    """``run_head_pgd_`` with the training step's guard (``ok``, ``skipped``), as the LPA site calls it: a
    NaN sample of class 1 leaves class 1's delta as it was (counted once when ok), the other classes
    move as the definition says; ``ok`` False leaves every class as it was and counts nothing."""
    from lpa_kernels._common import per_class
    from lpa_kernels.head_pgd.op import run_head_pgd_

    h, y, weight, b, delta = problem(40, 5, 11, [c % 5 for c in range(40)], dtype)
    h[1] = float("nan")  # a sample of class 1
    step, eps, direction = (per_class(v, 5, delta) for v in (0.3, 0.4, 1.0))
    start = delta.clone()
    skipped = torch.zeros((), dtype=torch.int64)
    flag = None if ok is None else torch.tensor(ok)
    run_head_pgd_(h, y, weight, b, delta, 2, step, eps, direction, "l2", "add", "reference", None, flag, skipped)
    if ok is False:
        assert torch.equal(delta, start) and skipped.item() == 0
        return
    assert torch.equal(delta[1], start[1]) and skipped.item() == 1
    expected = start.clone()
    definition(h, y, weight, b, expected, 2, step, eps, direction, "l2", "add")
    others = [0, 2, 3, 4]
    assert torch.isnan(expected[1]).all(), "test setup: the definition's class 1 should be NaN"
    torch.testing.assert_close(delta[others], expected[others])


@pytest.mark.parametrize("classes, batch, class_space", [(20000, 8, False), (2048, 4000, True)],
                         ids=["rows-K20000", "class-space-K2048"])
def test_sums_over_many_classes_keep_the_definitions_accuracy(reference_path, classes, batch, class_space,
                                                              monkeypatch):
    """float32 at K = 20,000 (each sample's softmax and gradient sum 20,000 terms) and in class space at
    K = 2,048 with 4,000 samples: the host kernel summed them one by one in float32 (~9x PyTorch's
    error at K = 20,000, ~100x at 131,072); in double now. The rule itself: at most twice the error of
    the definition run in float32 (the tolerance's relative floor would hide it)."""
    monkeypatch.setattr(loop, "use_class_space", lambda *args: class_space)
    torch.manual_seed(0)
    h, y, weight, bias, delta = problem(batch, classes, 64, None, torch.float32)
    start = delta.clone()
    head_pgd_(h, y, weight, bias, delta, 2, 0.05, 0.3, 1.0, "l2", "add", backend="reference")
    truth, lowp = start.double(), start.clone()
    definition(h.double(), y, weight.double(), bias.double(), truth, 2, 0.05, 0.3, 1.0, "l2", "add")
    definition(h, y, weight, bias, lowp, 2, 0.05, 0.3, 1.0, "l2", "add")
    error, own_error = ((t.double() - truth).abs().max().item() for t in (delta, lowp))
    assert error <= 2 * own_error, f"error {error:.2e}, PyTorch's {own_error:.2e}"
