"""The order guard's switch (``collectives.set_order_guard``), in one process with the collectives
recorded: on, each LPA all-reduce is preceded by the guard's ``all_gather`` and one host read; off, the
all-reduces run bare. (Two real processes: ``test_distributed.py``.)"""

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method, collectives, site
from tests.lpa.models import NUM_CLASSES, batch, mlp


@pytest.fixture
def recorded(monkeypatch):
    """Pretend to be one of two ranks whose peer does the same: all_gather copies this rank's row,
    all_reduce leaves the sum of one rank; every call is recorded by name."""
    calls = []

    def all_gather(table, mine):
        calls.append("all_gather")
        for t in table:
            t.copy_(mine)

    monkeypatch.setattr(collectives, "world_size", lambda: 2)
    monkeypatch.setattr(site, "world_size", lambda: 2)  # (its own binding: the fused head path is single-process)
    monkeypatch.setattr(collectives.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(collectives.dist, "all_gather", all_gather)
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda t, op=None: calls.append("all_reduce"))
    yield calls
    collectives.set_order_guard(True)


def _train_one_step():
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=LPAConfig(steps=0, direction="confidence"))
    x, y = batch()
    loss, _ = method.training_loss(x, y)
    loss.backward()
    method.after_backward()
    return method


def test_the_guard_gathers_before_every_lpa_all_reduce_and_set_order_guard_false_removes_it(recorded):
    _train_one_step()
    reduces = recorded.count("all_reduce")
    assert reduces >= 1 and recorded == ["all_gather", "all_reduce"] * reduces, recorded
    recorded.clear()
    collectives.set_order_guard(False)
    _train_one_step()
    assert recorded == ["all_reduce"] * reduces, recorded


def test_a_disagreeing_table_raises_collective_order_error(recorded, monkeypatch):
    def all_gather(table, mine):  # the peer is one training call behind
        table[0].copy_(mine)
        table[1].copy_(mine - torch.tensor([1, 0, 0]))

    monkeypatch.setattr(collectives.dist, "all_gather", all_gather)
    monkeypatch.setattr(collectives.dist, "get_rank", lambda: 0)
    with pytest.raises(collectives.CollectiveOrderError, match="out of step across ranks"):
        _train_one_step()


@pytest.mark.parametrize("name, layer, config, reduces", [
    ("lpa", "3", LPAConfig(steps=0, direction="confidence"), 1),  # class gradient and statistics packed
    ("lpa", "3", LPAConfig(steps=0, direction="ascent"), 1),  # no statistics read
    ("lpa", "3", LPAConfig(steps=0, direction="loss_trend"), 1),
    ("lpa+lpl", "3", LPAConfig(steps=0, lpl_steps=0, direction="confidence"), 2),  # one per site
    # T steps: the first step's gradient with the statistics the policy reads, then one per step
    ("lpa", "1", LPAConfig(steps=3, direction="confidence", radius="confidence"), 3),
    ("lpa", "3", LPAConfig(steps=2, head="never", direction="ascent"), 2),
])
def test_lpa_all_reduces_once_per_site_and_pgd_step(recorded, name, layer, config, reduces):
    method = build_method(name, mlp(), NUM_CLASSES, layer=layer, config=config)
    x, y = batch()
    for _ in range(2):
        recorded.clear()
        loss, _ = method.training_loss(x, y)
        loss.backward()
        method.after_backward()
        assert recorded == ["all_gather", "all_reduce"] * reduces, recorded


@pytest.mark.parametrize("value", [1, "off", None])
def test_set_order_guard_takes_a_bool_only(value):
    with pytest.raises(TypeError, match="enabled must be a bool"):
        collectives.set_order_guard(value)


@pytest.mark.parametrize("layer,steps", [("3", 3), ("1", 3), ("1", 0)], ids=["head-T3", "inner-T3", "inner-T0"])
def test_diagnostics_issues_no_collective(recorded, layer, steps):
    """diagnostics() is a local probe: one rank may call it (for logging) while its peers do not, so it may
    not issue an all-reduce (or the guard's all_gather) that only this rank would reach."""
    method = build_method("lpa", mlp(), NUM_CLASSES, layer=layer, config=LPAConfig(steps=steps))
    x, y = batch()
    method.training_loss(x, y)[0].backward()
    method.after_backward()
    recorded.clear()
    method.diagnostics(x, y)
    assert recorded == []
