"""``run_perturb`` (the training machinery's entry) checks each argument signature once: a signature that
passed is not checked again, a new one is, and one that failed raises every time."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels.perturb import naive, op


@pytest.fixture
def checks(monkeypatch):
    """The signatures ``_check_perturb_args`` was run on, from an empty memo."""
    monkeypatch.setattr(op, "_checked_signatures", {})
    seen, check = [], op._check_perturb_args

    def counted(h, labels, delta, mode, backend, label_values=True):
        seen.append((tuple(h.shape), tuple(delta.shape), mode))
        return check(h, labels, delta, mode, backend, label_values)

    monkeypatch.setattr(op, "_check_perturb_args", counted)
    return seen


def test_a_signature_is_checked_once(checks):
    h, labels, delta = torch.randn(5, 7), torch.tensor([0, 2, 1, 2, 0]), torch.randn(3, 7)
    for _ in range(3):
        torch.testing.assert_close(op.run_perturb(h, labels, delta, "add", "reference"), naive.perturb(h, labels, delta))
    assert checks == [((5, 7), (3, 7), "add")]
    op.run_perturb(h[:4], labels[:4], delta, "add", "reference")  # another batch size: checked
    op.run_perturb(h, labels, delta, "scale", "reference")  # another mode: checked
    assert len(checks) == 3


@pytest.mark.parametrize("bad", ["delta shape", "label shape", "label dtype", "mode"])
def test_a_failing_signature_raises_every_time(checks, bad):
    h, labels, delta, mode = torch.randn(5, 7), torch.tensor([0, 2, 1, 2, 0]), torch.randn(3, 7), "add"
    op.run_perturb(h, labels, delta, mode, "reference")  # a good signature first
    if bad == "delta shape":
        delta = torch.randn(3, 6)
    elif bad == "label shape":
        labels = labels[:4]
    elif bad == "label dtype":
        labels = labels.float()
    else:
        mode = "multiply"
    for _ in range(2):
        with pytest.raises((ValueError, TypeError)):
            op.run_perturb(h, labels, delta, mode, "reference")
    assert len(checks) == 3


def test_other_tensor_types_are_checked_every_call(checks):
    h, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    delta = torch.nn.Parameter(torch.zeros(2, 3))
    for _ in range(2):
        op.run_perturb(h, labels, delta, "add", "reference")
    assert len(checks) == 2
