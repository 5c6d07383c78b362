"""The method's state in state dicts: what standard checkpoint code saves, restores and refuses."""

import copy
import io

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, batch, mlp

CONFIG = LPAConfig(steps=0, lpl_steps=0, direction="loss_trend")


def trained(steps: int = 2, seed: int = 0):
    """An lpa+lpl method (loss_trend policy) after ``steps`` training steps, with its optimizer."""
    torch.manual_seed(seed)
    method = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
    optimizer = torch.optim.SGD(method.model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        train_step(method, optimizer, step)
    return method, optimizer


def train_step(method, optimizer, step: int):
    x, y = batch(seed=step)
    loss, _ = method.as_module()(x, y)
    optimizer.zero_grad()
    loss.backward()
    method.after_backward()
    optimizer.step()


def round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_module_state_dict_holds_delta_policy_state_and_counters():
    method, _ = trained()
    state = method.as_module().state_dict()
    lpa_keys = {k for k in state if k.startswith("lpa_state.")}
    assert lpa_keys == {"lpa_state.counters." + c for c in ("lower_forwards", "upper_forwards", "training_steps", "pgd_steps")} | {
        f"lpa_state.{site}.{name}" for site in ("lpa", "lpl")
        for name in ("delta", "skipped_updates", "loss_ema", "fall_ema", "skipped_statistics")}
    assert torch.equal(state["lpa_state.lpa.delta"], method.delta)
    assert torch.equal(state["lpa_state.lpl.fall_ema"], method.lpl.policy.fall_ema)
    assert int(state["lpa_state.counters.training_steps"]) == 2
    assert state["lpa_state.lpa.delta"].abs().sum() > 0
    assert set(method.state_dict()) == {k.removeprefix("lpa_state.") for k in lpa_keys}


def test_standard_checkpoint_code_restores_a_run_that_continues_bitwise():
    original, optimizer = trained()
    saved = round_trip({"module": original.as_module().state_dict(), "optimizer": optimizer.state_dict()})
    restored = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)  # no delta yet
    restored.as_module().load_state_dict(saved["module"])
    restored_optimizer = torch.optim.SGD(restored.model.parameters(), lr=0.1, momentum=0.9)
    restored_optimizer.load_state_dict(saved["optimizer"])
    assert restored.stats() == original.stats()
    for step in (2, 3):
        train_step(original, optimizer, step)
        train_step(restored, restored_optimizer, step)
    for key, value in original.as_module().state_dict().items():
        assert torch.equal(restored.as_module().state_dict()[key], value), key


def _snapshot(method):
    return {k: v.clone() for k, v in method.as_module().state_dict().items()}


def _assert_unchanged(method, before):
    after = method.as_module().state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"lpa_state.lpa.delta": torch.zeros(NUM_CLASSES, 9, dtype=torch.float64)}),
     r"'lpa_state.lpa.delta' has shape \(4, 9\), expected \(4, 7\) \(K=4 classes x the per-class shape \(7,\)\)"),
    (lambda s: s.update({"lpa_state.lpl.delta": torch.zeros(3, 4, dtype=torch.float64)}),
     r"'lpa_state.lpl.delta' has shape \(3, 4\), expected \(4, 4\)"),
    (lambda s: s.update({"lpa_state.lpa.loss_ema": torch.zeros(5, dtype=torch.float64)}),
     r"'lpa_state.lpa.loss_ema' has shape \(5,\), expected \(4,\) \(one value per class, K=4\)"),
    (lambda s: s.update({"lpa_state.lpa.skipped_updates": torch.tensor(1.0)}), "expected an integer dtype"),
    (lambda s: s.pop("lpa_state.lpl.fall_ema"), "missing key.*'lpa_state.lpl.fall_ema'"),
    (lambda s: s.update({"lpa_state.lpa.momentum": torch.zeros(4)}), "unexpected key 'lpa_state.lpa.momentum'"),
    (lambda s: s.update({"model.0.weight": torch.zeros(9, 5, dtype=torch.float64)}),
     r"'model.0.weight' has shape \(9, 5\), expected \(9, 6\)"),
    (lambda s: s.update({"delta": torch.zeros(4, 7)}), "unexpected key.*'delta'"),
])
def test_a_mismatched_state_names_the_key_and_expected_shape_and_changes_nothing(edit, message):
    target, _ = trained(seed=1)
    before = _snapshot(target)
    state = trained()[0].as_module().state_dict()
    edit(state)
    with pytest.raises(ValueError, match=message):
        target.as_module().load_state_dict(state)
    _assert_unchanged(target, before)


def test_a_fresh_method_takes_a_saved_delta_on_the_models_device_and_a_baseline_only_counters():
    source, _ = trained()
    fresh = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
    with pytest.raises(ValueError, match=r"'lpa.delta' has shape \(3, 7\), expected \(4, \.\.\.\)"):
        fresh.load_state_dict({**source.state_dict(), "lpa.delta": torch.zeros(3, 7, dtype=torch.float64)})
    assert fresh.delta is None, "a rejected state created delta"
    fresh.load_state_dict(source.state_dict())
    assert torch.equal(fresh.delta, source.delta) and fresh.delta.device == next(fresh.model.parameters()).device
    erm = build_method("erm", mlp(), NUM_CLASSES, layer="3")
    assert set(erm.state_dict()) == {f"counters.{c}" for c in ("lower_forwards", "upper_forwards", "training_steps", "pgd_steps")}
    with pytest.raises(ValueError, match="unexpected key 'lpa.delta' in the state of method 'erm'"):
        erm.load_state_dict(source.state_dict())


def test_torch_distributed_checkpoint_state_dict_functions_keep_it_too():
    # the checkpoint code of FSDP2 users: keys are mapped to tensors through attributes
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    original, _ = trained()
    state = get_model_state_dict(original.as_module(), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert torch.equal(state["lpa_state.lpl.delta"], original.logit_delta)
    assert original.as_module().lpa_state.lpa.fall_ema is original.lpa.policy.fall_ema
    restored = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
    set_model_state_dict(restored.as_module(), round_trip(state))
    for key, value in original.as_module().state_dict().items():
        assert torch.equal(restored.as_module().state_dict()[key], value), key


@pytest.mark.parametrize("dropped", ["lpa_state.lpa.fall_ema", "lpa_state.lpa.loss_ema"])
def test_a_fresh_method_refuses_half_of_the_loss_trend_state_before_taking_any(dropped):
    state = trained()[0].as_module().state_dict()
    state.pop(dropped)
    fresh = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
    before = fresh.as_module().state_dict()
    with pytest.raises(ValueError, match=f"missing key '{dropped}'.*'loss_trend' state"):
        fresh.as_module().load_state_dict(state)
    after = fresh.as_module().state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items()), "state changed"


def test_a_fresh_method_checks_a_loaded_delta_against_its_first_batch():
    """Before the first batch the per-class shape is unknown, so a loaded delta is checked there: one of
    another per-class shape (here one scalar per class, with layout "full") is refused before anything
    changes; one of another float dtype is taken in the dtype a trained method would have (its own)."""
    source, _ = trained()
    state = source.state_dict()
    fresh = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
    fresh.load_state_dict({**state, "lpa.delta": torch.full((NUM_CLASSES,), 0.1, dtype=torch.float64)})
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"the loaded delta has per-class shape \(\), but this layer's activations "
                                         r"\(7,\) give \(7,\)"):
        fresh.training_loss(*batch())
    after = fresh.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the refused batch changed the state"

    for dtype in (torch.float32, torch.float64):  # the model is float64: delta is float64 after a batch
        fresh = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=CONFIG)
        fresh.load_state_dict({**state, "lpa.delta": state["lpa.delta"].to(dtype)})
        train_step(fresh, torch.optim.SGD(fresh.model.parameters(), lr=0.1), 0)
        assert fresh.delta.dtype == torch.float64


@pytest.mark.parametrize("through", ["method", "as_module"])
def test_a_checkpoint_replaces_a_loaded_delta_its_first_batch_refused(through):
    """The refused delta fixes no per-class shape: the right checkpoint loads over it, and the method trains
    as one that loaded it in the first place."""
    source, _ = trained()
    holder = (lambda m: m) if through == "method" else (lambda m: m.as_module())
    state = holder(source).state_dict()
    key = "lpa.delta" if through == "method" else "lpa_state.lpa.delta"
    model = mlp()
    fresh = build_method("lpa+lpl", copy.deepcopy(model), NUM_CLASSES, layer="3", config=CONFIG)
    holder(fresh).load_state_dict({**state, key: torch.zeros(NUM_CLASSES, 9, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"the loaded delta has per-class shape \(9,\)"):
        fresh.training_loss(*batch())
    holder(fresh).load_state_dict(state)
    direct = build_method("lpa+lpl", copy.deepcopy(model), NUM_CLASSES, layer="3", config=CONFIG)
    holder(direct).load_state_dict(state)
    for method in (fresh, direct):
        train_step(method, torch.optim.SGD(method.model.parameters(), lr=0.1), 0)
    assert torch.equal(fresh.delta, direct.delta) and torch.equal(fresh.logit_delta, direct.logit_delta)
