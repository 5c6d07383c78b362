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
    results = [run_head_pgd_(flat_h, labels, weight, None, torch.zeros(7, 15, device=device), 3, *per_class, "l2",
                             "add", backend, given) for given in (None, plan)]
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
