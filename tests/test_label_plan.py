"""``_common.label_plan``: one sort of a batch's labels that every kernel of a training step reuses; the
plan gives exactly what each launcher would build from the labels itself, and the ops given it agree."""

import pytest
import torch

from lpa_kernels._common import _sorted_segments, class_order, class_segments, label_plan, unpack_label_plan
from lpa_kernels.head_pgd.op import run_head_pgd_
from lpa_kernels.perturb.op import run_perturb
from tests.helpers import KERNEL_TARGETS


@pytest.mark.parametrize("batch,num_classes", [(0, 3), (1, 1), (17, 5), (40, 1000), (64, 2)])
def test_plan_unpacks_to_what_each_launcher_builds(batch, num_classes):
    labels = torch.randint(0, num_classes, (batch,), dtype=torch.int32)
    plan = label_plan(labels, num_classes)
    order, starts, segment_class, segment_start = unpack_label_plan(plan, batch, num_classes)
    counts = torch.zeros(num_classes, dtype=torch.int64).index_add_(0, labels.long(), torch.ones(batch, dtype=torch.int64))
    assert torch.equal(starts, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert torch.equal(order, torch.argsort(labels, stable=True))
    for built, planned in ((class_order(labels, num_classes), class_order(labels, num_classes, plan)),
                           (class_segments(labels, num_classes), class_segments(labels, num_classes, plan))):
        assert all(torch.equal(a, b) for a, b in zip(built, planned))
    assert torch.equal(segment_class, _sorted_segments(labels, num_classes)[1])


@pytest.mark.parametrize("target", KERNEL_TARGETS)
def test_ops_given_the_plan_match_the_ops_without_it(target):
    backend, device = target
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (33,), generator=gen).to(device)
    h = torch.randn(33, 3, 5, generator=gen).to(device)
    delta = torch.randn(7, 3, 5, generator=gen).to(device)
    plan = label_plan(labels, 7)
    grads = []
    for given in (None, plan):
        leaf = delta.clone().requires_grad_(True)
        run_perturb(h, labels, leaf, "scale", backend, given).pow(2).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    weight, flat_h = torch.randn(7, 15, generator=gen).to(device), h.flatten(1)
    per_class = [torch.full((7,), v, device=device) for v in (0.1, 1.0, 1.0)]
    results = [torch.zeros(7, 15, device=device) for _ in range(2)]
    for delta, given in zip(results, (None, plan)):
        run_head_pgd_(flat_h, labels, weight, None, delta, 3, *per_class, "l2", "add", backend, given)
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def _chunk_plan_definition(segment_start, R, chunk, programs):
    """``_triton_common.chunk_plan``'s tables in torch ops: each segment's chunks, their running start, and
    for each program the segment owning it."""
    chunks = ((segment_start[1:] - segment_start[:-1]) * R + chunk - 1) // chunk
    first_chunk = torch.cat([torch.zeros(1, dtype=torch.int64), chunks.cumsum(0)])
    return torch.searchsorted(first_chunk[1:], torch.arange(programs), right=True), first_chunk


@pytest.mark.parametrize("segments", [1, 5, 1023, 1024, 1025, 3000])
@pytest.mark.parametrize("shape", ["random", "one long class", "empty segments"])
def test_the_one_program_chunk_plan_equals_its_definition(segments, shape):
    """The chunk plan's kernel (one program: a running sum over blocks of 1024 segments, then a binary
    search per program) against the torch ops it replaces, at segment counts around its block."""
    from lpa_kernels._triton_common import chunk_plan
    from lpa_kernels.backend import interpreting

    if not interpreting():
        pytest.skip("runs a Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(segments)
    counts = torch.randint(1, 40, (segments,), generator=gen)
    if shape == "one long class":
        counts[segments // 2] = 5000
    if shape == "empty segments":  # padding segments: no samples
        counts[torch.rand(segments, generator=gen) < 0.5] = 0
        counts[0] = 60
    segment_start = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    R, rows = 3, int(counts.sum()) * 3
    plan = chunk_plan(segment_start, R, rows, 4, 2)
    assert plan is not None, "test setup: no chunking"
    chunk, chunk_segment, first_chunk = plan
    expected_segment, expected_first = _chunk_plan_definition(segment_start, R, chunk, chunk_segment.numel())
    assert torch.equal(first_chunk, expected_first) and torch.equal(chunk_segment, expected_segment)


@pytest.mark.parametrize("target", KERNEL_TARGETS[:1])  # Triton (the counter does not see the CUDA C++ launches)
@pytest.mark.parametrize("above", ["below", "sorted", "above"], ids=["one-launch", "sorted", "above-both"])
def test_public_ops_build_their_label_plan_in_one_launch(target, above, monkeypatch):
    """perturb's backward and class_grad_pgd_step_ called without the training step's plan build it in one
    launch (step_update.plan.call_plan) instead of sorting the labels in ~13 ATen launches; above
    ONE_LAUNCH_PLAN_MAX in two (the sorted plan), and with more samples than SORTED_PLAN_MAX_B too in the
    definition's ops."""
    from lpa_bench.static.counting import LaunchCounter
    from lpa_kernels import class_grad_pgd_step_, perturb
    from lpa_kernels.step_update import plan as plan_module

    backend, device = target
    monkeypatch.setenv("LPA_POISON", "0")
    if above != "below":
        monkeypatch.setattr(plan_module, "ONE_LAUNCH_PLAN_MAX", 33 * 7 - 1)
    if above == "above":
        monkeypatch.setattr(plan_module, "SORTED_PLAN_MAX_B", 32)
    labels = torch.randint(0, 7, (33,), device=device)
    h, delta = torch.randn(33, 20, device=device), torch.zeros(7, 20, device=device, requires_grad=True)
    out = perturb(h, labels, delta, backend=backend)
    for call in (lambda: out.sum().backward(),
                 lambda: class_grad_pgd_step_(delta.detach(), h, labels, 0.1, 1.0, backend=backend)):
        with LaunchCounter() as counts:
            call()
        summary = counts.summary()
        planned = tuple(summary["triton"].get(f"step_update._{name}_kernel", 0)
                        for name in ("checked_label_plan", "sorted_label_plan", "class_starts"))
        expected = {"below": (1, 0, 0), "sorted": (0, 1, 1), "above": (0, 0, 0)}[above]
        assert (planned, "argsort" in summary["aten"]) == (expected, above == "above"), summary
