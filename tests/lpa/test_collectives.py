"""The order guard (``collectives.set_order_guard``) in one process pretending to be one of two ranks
(``fake_world``): which collectives each LPA all-reduce takes in each mode, the "device" guard's verdict
(nothing updated, ``sync`` raising) and the "host" guard's immediate error. (Two real processes:
``test_distributed.py``; no host read with the default guard: ``test_step_syncs.py``.)"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lpa_kernels.lpa import LPAConfig, build_method, collectives
from lpa_kernels.lpa.policies import RADII
from lpa_kernels.lpa.state import state_tensors
from tests.lpa.fake_world import out_of_step_peer, pretend_two_ranks
from tests.lpa.models import NUM_CLASSES, batch, mlp


@pytest.fixture(autouse=True)
def default_guard():
    yield
    collectives.set_order_guard(True)


def _train_step(method, seed=0):
    x, y = batch(seed=seed)
    loss, _ = method.training_loss(x, y)
    loss.backward()
    method.after_backward()


def _single_pass():
    return build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=LPAConfig(steps=0, direction="confidence"))


@pytest.mark.parametrize("mode, per_reduce", [
    (True, ["all_reduce"]), ("device", ["all_reduce"]), ("host", ["all_gather", "all_reduce"]), (False, ["all_reduce"]),
])
def test_each_mode_takes_its_collectives(monkeypatch, mode, per_reduce):
    calls = pretend_two_ranks(monkeypatch)
    collectives.set_order_guard(mode)
    _train_step(_single_pass())
    assert calls == per_reduce, calls


@pytest.mark.parametrize("name, layer, config, reduces", [
    ("lpa", "3", LPAConfig(steps=0, direction="confidence"), 1),  # class gradient and statistics packed
    ("lpa", "3", LPAConfig(steps=0, direction="ascent"), 1),  # no statistics read
    ("lpa", "3", LPAConfig(steps=0, direction="loss_trend"), 1),
    ("lpa+lpl", "3", LPAConfig(steps=0, lpl_steps=0, direction="confidence"), 2),  # one per site
    # T steps: the first step's gradient with the statistics the policy reads, then one per step
    ("lpa", "1", LPAConfig(steps=3, direction="confidence", radius="confidence"), 3),
    ("lpa", "3", LPAConfig(steps=2, head="never", direction="ascent"), 2),
])
@pytest.mark.parametrize("mode", ["device", "host"])
def test_lpa_all_reduces_once_per_site_and_pgd_step(monkeypatch, name, layer, config, reduces, mode):
    calls = pretend_two_ranks(monkeypatch)
    collectives.set_order_guard(mode)
    method = build_method(name, mlp(), NUM_CLASSES, layer=layer, config=config)
    for seed in range(2):
        calls.clear()
        _train_step(method, seed)
        assert calls == ["all_reduce"] * reduces if mode == "device" else ["all_gather", "all_reduce"] * reduces, calls
    method.sync()  # the peer was in step: nothing to raise


class _CountedOps(TorchDispatchMode):
    """The ATen ops that run inside, views (no kernel) left out."""

    VIEWS = {"slice", "select", "view", "split", "split_with_sizes", "alias", "_unsafe_view", "detach", "as_strided"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_the_device_guard_costs_one_upload_and_five_kernels_per_all_reduce(monkeypatch):
    """Budget (counted, not timed): what the "device" guard adds to an unchecked all-reduce."""
    ops = {}
    for mode in ("device", False):
        calls = pretend_two_ranks(monkeypatch)
        collectives.set_order_guard(mode)
        method = _single_pass()
        _train_step(method, seed=0)
        calls.clear()
        with _CountedOps() as counted:
            _train_step(method, seed=1)
        assert calls == ["all_reduce"]
        ops[mode] = counted.ops
    added = ops["device"] - ops[False]
    assert sum(added.values()) <= 6 and not ops[False] - ops["device"], dict(added)


def test_the_host_guard_raises_before_the_all_reduce_when_the_table_disagrees(monkeypatch):
    calls = pretend_two_ranks(monkeypatch, peer=out_of_step_peer)
    collectives.set_order_guard("host")
    with pytest.raises(collectives.CollectiveOrderError, match="out of step across ranks"):
        _train_step(_single_pass())
    assert calls == ["all_gather"]


# policies whose update would move delta even with the zeroed gradient and statistics of an out-of-step
# all-reduce (a radius from the statistics, the trend state), single pass and T steps on the autograd path
OUT_OF_STEP_CASES = {
    "single-pass": ("lpa", dict(steps=0, direction="confidence")),
    "single-pass-confidence-radius": ("lpa", dict(steps=0, radius="confidence", norm="linf")),
    "single-pass-loss-trend": ("lpa", dict(steps=0, direction="loss_trend")),
    "single-pass-lpa+lpl": ("lpa+lpl", dict(steps=0, lpl_steps=0)),
    "t-step": ("lpa", dict(steps=2, head="never", init="carried", radius="confidence")),
    "t-step-loss-trend": ("lpa", dict(steps=1, head="never", init="carried", direction="loss_trend")),
    # a fresh delta is zeroed before the step's all-reduces find the ranks out of step: restored after them
    "t-step-fresh": ("lpa", dict(steps=2, head="never", init="fresh")),
    "single-pass-lpa+t-step-lpl": ("lpa+lpl", dict(steps=0, lpl_steps=2)),
}


def _state(method):
    """The method's state but its call counters (``state_dict`` without its ``sync``, which would raise)."""
    return {k: v.clone() for k, v in state_tensors(method).items() if not k.startswith("counters.")}


@pytest.mark.parametrize("case", list(OUT_OF_STEP_CASES))
def test_the_device_guard_updates_nothing_out_of_step_and_sync_raises_then_recovers(monkeypatch, case):
    out_of_step = {"now": False}
    pretend_two_ranks(monkeypatch, peer=lambda t: out_of_step_peer(t) if out_of_step["now"] else t.clone())
    name, config = OUT_OF_STEP_CASES[case]
    method = build_method(name, mlp(), NUM_CLASSES, layer="3", config=LPAConfig(**config),
                          class_counts=torch.tensor([40, 30, 20, 10]))
    _train_step(method, seed=0)
    _train_step(method, seed=1)
    before = _state(method)
    calls_before = collectives._guard["call"]
    out_of_step["now"] = True
    _train_step(method, seed=2)  # the peer was one training call behind: every all-reduce disagrees
    out_of_step["now"] = False
    _train_step(method, seed=3)  # in step again, but the verdict holds until it is reported
    after = _state(method)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{case}: {key} changed after the ranks went out of step"
    with pytest.raises(collectives.CollectiveOrderError,
                       match=rf"rank 0's all-reduce 1 of training call {calls_before + 1} \(mod 2\^30\)"):
        method.sync()
    method.sync()  # reported once
    _train_step(method, seed=4)
    assert not torch.equal(method.delta, before["lpa.delta"]), f"{case}: delta did not move after the report"


def test_a_users_policy_moves_nothing_out_of_step(monkeypatch):
    """Out of step, the all-reduced gradient and statistics are zeroed. A user's radius policy may give the
    classes (absent from zeroed statistics) a smaller radius, whose projection would move delta; but a class
    whose gradient is all zero keeps its delta (``pgd_step_``), so nothing moves."""
    RADII.register("quarter_when_absent", "eps where the class is in the batch, eps / 4 elsewhere", batch=True)(
        lambda inputs: torch.where(inputs.present, 1.0, 0.25).double() * inputs.eps)
    try:
        out_of_step = {"now": False}
        pretend_two_ranks(monkeypatch, peer=lambda t: out_of_step_peer(t) if out_of_step["now"] else t.clone())
        config = LPAConfig(steps=0, norm="linf", eps=1.0, step_size=0.2, radius="quarter_when_absent")
        method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=config)
        for seed in range(3):
            _train_step(method, seed)
        before = method.delta.clone()
        assert before.abs().max() > 0.25, "the in-step steps left delta inside the smaller radius: no test"
        out_of_step["now"] = True
        _train_step(method, seed=3)
        assert torch.equal(method.delta, before)
    finally:
        RADII.remove("quarter_when_absent")


@pytest.mark.parametrize("leave", ["guard off", "single process"])
def test_a_pending_verdict_restores_nothing_once_the_device_guard_does_not_apply_but_is_still_reported(
        monkeypatch, leave):
    """A fresh delta is restored after the all-reduces when the ranks are out of step: not once the device
    guard stops applying, whatever verdict it left pending (which ``sync`` still reports)."""
    out_of_step = {"now": True}
    pretend_two_ranks(monkeypatch, peer=lambda t: out_of_step_peer(t) if out_of_step["now"] else t.clone())
    config = LPAConfig(steps=1, head="never", init="fresh", direction="ascent")
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=config)
    _train_step(method, seed=0)  # out of step: the verdict fails and waits for sync
    out_of_step["now"] = False
    if leave == "guard off":
        collectives.set_order_guard(False)
    else:
        monkeypatch.setattr(collectives, "world_size", lambda: 1)
    assert collectives.order_ok(method.delta.device) is None
    before = method.delta.clone()
    _train_step(method, seed=1)
    assert not torch.equal(method.delta, before)
    with pytest.raises(collectives.CollectiveOrderError):
        method.sync()


@pytest.mark.parametrize("mode", ["device", "host"])
def test_compiled_all_reduces_are_left_unchecked_in_every_mode(monkeypatch, mode):
    """The T-step path all-reduces inside ``compiled_training_loss``'s graph: no signature and no
    ``all_gather`` there (the host check's read cannot be traced: it failed with Unsupported)."""
    calls = pretend_two_ranks(monkeypatch)
    collectives.set_order_guard(mode)
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="3", config=LPAConfig(steps=2, head="never"))
    training_loss = method.compiled_training_loss(backend="aot_eager")
    for seed in range(3):  # the first call runs eagerly
        x, y = batch(seed=seed)
        calls.clear()
        training_loss(x, y)[0].backward()
        method.after_backward()
    assert calls == ["all_reduce"] * 2, calls  # the last call's, compiled: the eager first one was checked
    method.sync()


@pytest.mark.parametrize("dtype, world, check", [
    (torch.float32, 2, "device"), (torch.float64, 2, "device"), (torch.float32, 4096, "device"),
    (torch.float32, 4097, "host"), (torch.float64, 10**6, "device"), (torch.bfloat16, 2, "host"),
    (torch.float16, 2, "host"),
])
def test_the_device_guard_signs_only_where_its_sums_are_exact(monkeypatch, dtype, world, check):
    monkeypatch.setattr(collectives, "world_size", lambda: world)
    assert collectives._check_kind(torch.zeros(3, dtype=dtype)) == check


def test_the_signature_digits_round_trip():
    for value in (0, 1, 63, 64, 2**30 - 1, 123456789):
        assert collectives._from_digits(collectives._digits(value, 5)) == value % 2**30


@pytest.mark.parametrize("mode, error", [(1, TypeError), (None, TypeError), ("off", ValueError), ("Device", ValueError)])
def test_set_order_guard_names_what_it_takes(mode, error):
    with pytest.raises(error, match="mode must be"):
        collectives.set_order_guard(mode)


@pytest.mark.parametrize("layer,steps", [("3", 3), ("1", 3), ("1", 0)], ids=["head-T3", "inner-T3", "inner-T0"])
def test_diagnostics_issues_no_collective(monkeypatch, layer, steps):
    """diagnostics() is a local probe: one rank may call it (for logging) while its peers do not, so it may
    not issue an all-reduce (or the guard's all_gather) that only this rank would reach."""
    calls = pretend_two_ranks(monkeypatch)
    method = build_method("lpa", mlp(), NUM_CLASSES, layer=layer, config=LPAConfig(steps=steps))
    _train_step(method)
    calls.clear()
    method.diagnostics(*batch())
    assert calls == []
