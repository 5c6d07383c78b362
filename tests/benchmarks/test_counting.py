"""``lpa_bench.static.counting.LaunchCounter`` on code whose launches and host reads are known: every call
that makes a GPU's host wait counts once (twice for bincount), outside our custom ops and inside their
bodies (where composite calls such as ``.item()`` reach the counter undecomposed), and every call of a
Triton launcher counts."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lpa_bench.static.counting import LaunchCounter
from lpa_kernels.backend import interpreting

x = torch.tensor([0.0, 1.0, 2.0])
mask = torch.tensor([True, False, True])

HOST_READS = {  # a call, the host reads it makes on a GPU
    "item": (lambda: x.sum().item(), 1),
    "bool": (lambda: bool(x.sum()), 1),
    "if any": (lambda: 1 if x.any() else 0, 1),
    "int": (lambda: int(x.sum()), 1),
    "float": (lambda: float(x.sum()), 1),
    "nonzero": (lambda: x.nonzero(), 1),
    "where(cond)": (lambda: torch.where(x > 0), 1),
    "argwhere": (lambda: torch.argwhere(x), 1),
    "mask read": (lambda: x[mask], 1),
    "mask write": (lambda: x.clone().__setitem__(mask, torch.tensor(5.0)), 1),
    "masked_select": (lambda: x.masked_select(mask), 1),
    "unique": (lambda: torch.unique(x), 1),
    "bincount": (lambda: torch.bincount(x.long()), 2),
    "repeat_interleave": (lambda: torch.repeat_interleave(torch.tensor([1, 2])), 1),
    "equal": (lambda: torch.equal(x, x), 1),
    "allclose": (lambda: torch.allclose(x, x), 1),
    "histc default range": (lambda: torch.histc(x, bins=4), 1),
    "tolist": (lambda: x.tolist(), 1),
    "none: where(cond, a, b)": (lambda: torch.where(x > 0, x, -x), 0),
    "none: integer index": (lambda: x[torch.tensor([0, 2])], 0),
    "none: histc given range": (lambda: torch.histc(x, bins=4, min=0, max=3), 0),
    "none: repeat_interleave with output_size": (lambda: torch.repeat_interleave(torch.tensor([1, 2]),
                                                                                 output_size=3), 0),
}


@torch.library.custom_op("lpa_counting_test::run_case", mutates_args=())
def _run_case(t: torch.Tensor, case: str) -> torch.Tensor:
    HOST_READS[case][0]()
    return t.clone()


@pytest.mark.parametrize("case", list(HOST_READS))
def test_host_reads_are_counted_outside_a_custom_op(case):
    call, reads = HOST_READS[case]
    with LaunchCounter() as counts:
        call()
    assert counts.summary()["host_reads"] == reads, counts.summary()


@pytest.mark.parametrize("case", list(HOST_READS))
def test_host_reads_are_counted_inside_our_custom_ops(case, monkeypatch):
    """The counter re-enters ``lpa_kernels::`` op bodies; a test op under another namespace stands in for
    one (``_custom_op`` is told its namespace is ours)."""
    from lpa_bench.static import counting

    def definition(func):
        if func.namespace != "lpa_counting_test":
            return None
        from torch._library.custom_ops import _maybe_get_opdef

        return _maybe_get_opdef(func._name)

    monkeypatch.setattr(counting, "_custom_op", definition)
    with LaunchCounter() as counts:
        torch.ops.lpa_counting_test.run_case(x, case)
    assert counts.summary()["host_reads"] == HOST_READS[case][1], counts.summary()


@triton.jit
def _add_one(out_ptr):
    tl.store(out_ptr, tl.load(out_ptr) + 1)


@pytest.mark.skipif(not interpreting(), reason="runs a Triton kernel: needs TRITON_INTERPRET=1")
def test_every_call_of_a_triton_launcher_counts():
    out = torch.zeros(1)
    with LaunchCounter() as counts:
        launch = _add_one[(1,)]
        launch(out)
        launch(out)
        _add_one[(1,)](out)
    assert counts.summary()["triton_launches"] == 3 and float(out) == 3.0
