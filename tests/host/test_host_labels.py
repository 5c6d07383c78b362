"""The host-side range check of CPU labels (``_checks.check_labels``) on the reference backend's two paths:
the host C++ ``label_range`` and ``torch.aminmax``, with the same verdicts and messages."""

from __future__ import annotations

import pytest
import torch

from lpa_kernels import _checks, _host_ext


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 37, 1000])
def test_label_range_is_the_smallest_and_largest_label(dtype, batch):
    torch.manual_seed(batch)
    labels = torch.randint(-5, 50, (batch,), dtype=dtype)
    assert _host_ext.label_range(labels) == tuple(torch.stack(torch.aminmax(labels)).tolist())
    extremes = torch.tensor([torch.iinfo(dtype).min, 3, torch.iinfo(dtype).max], dtype=dtype)
    assert _host_ext.label_range(extremes) == (torch.iinfo(dtype).min, torch.iinfo(dtype).max)


@pytest.mark.parametrize("case", ["empty", "strided", "int16", "2-d", "float"])
def test_label_range_declines_what_it_does_not_serve(case):
    labels = {"empty": torch.zeros(0, dtype=torch.int64), "strided": torch.arange(10)[::2],
              "int16": torch.arange(4, dtype=torch.int16), "2-d": torch.zeros(2, 2, dtype=torch.int64),
              "float": torch.zeros(3)}[case]
    assert _host_ext.label_range(labels) is None


@pytest.mark.parametrize("labels,message", [
    ([0, 4, 2], None), ([0, 5, 2], r"got values in \[0, 5\]"), ([-1, 3], r"got values in \[-1, 3\]"),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_check_labels_on_both_paths(reference_path, labels, message, dtype):
    labels = torch.tensor(labels, dtype=dtype)
    if message is None:
        assert _checks.check_labels(labels, len(labels), 5) is labels
    else:
        with pytest.raises(ValueError, match=message):
            _checks.check_labels(labels, len(labels), 5)
    if reference_path.name == "host":
        assert reference_path.calls == ["label_range"]
    strided = torch.stack([labels, labels], dim=1)[:, 0]  # not contiguous: torch.aminmax on either path
    if message is not None:
        with pytest.raises(ValueError, match=message):
            _checks.check_labels(strided, len(labels), 5)
