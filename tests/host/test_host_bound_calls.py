"""``_host_ext.BoundCall``: the single-pass training step's statistics and update calls, bound once and
repeated on the same state tensors. A repeat computes what a fresh call computes, refuses anything that is
not the bound call (another tensor, a moved one, another dtype or shape, the kernels switched off) without
writing, and the training step that repeats them trains as the PyTorch path does, across state that is
replaced mid-run (a reloaded state dict, a delta moved to another dtype)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lpa_kernels import _host_ext
from lpa_kernels.lpa import LPAConfig, build_method, head_loss
from lpa_kernels.step_update import op
from tests.host.test_host_step_update import PARAMS, log_probs_of, policy_stats

pytestmark = pytest.mark.skipif(not _host_ext.is_built(), reason="the host extension is not built")


def _stats_call(classes=5, batch=7):
    stats = torch.zeros(3, classes, dtype=torch.float64)
    log_probs, labels = log_probs_of(batch, classes, torch.float64, False), torch.randint(0, classes, (batch,))
    bound = op.class_stats_(stats, log_probs, labels, None, True, "reference")
    assert bound is not None
    return bound, stats


def _update_call(classes=6, features=4):
    stats = policy_stats(classes, torch.float32, "mixed")
    delta, grad = torch.zeros(classes, features), torch.randn(classes, features)
    step, ok, skipped = torch.full((classes,), 0.1), torch.tensor(True), torch.tensor(0)
    tensors = [stats, None, None, None, None, None, delta, step, ok, skipped]
    bound = op.policy_pgd_step_(stats, None, None, None, None, None, PARAMS, "confidence", "confidence", False, True,
                                delta, grad, step, "l2", ok, skipped, "reference")
    assert bound is not None
    return bound, tensors


def test_a_repeated_statistics_call_adds_what_a_fresh_call_adds():
    bound, stats = _stats_call()
    for seed in range(3):
        torch.manual_seed(seed)
        log_probs, labels = log_probs_of(7, 5, torch.float64, False), torch.randint(0, 5, (7,))
        want = stats.clone()
        op.class_stats_(want, log_probs, labels, None, True, "reference")
        version = stats._version
        assert bound.repeat((stats, None), log_probs, labels)
        torch.testing.assert_close(stats, want, rtol=0, atol=0)
        assert stats._version > version


def test_a_repeated_update_moves_delta_as_a_fresh_call_does():
    bound, tensors = _update_call()
    stats, delta = tensors[0], tensors[6]
    for seed in range(3):
        torch.manual_seed(seed)
        grad = torch.randn_like(delta)
        stats.copy_(policy_stats(6, torch.float32, "mixed"))
        want_stats, want_delta, want_skipped = stats.clone(), delta.clone(), tensors[9].clone()
        op.policy_pgd_step_(want_stats, None, None, None, None, None, PARAMS, "confidence", "confidence", False, True,
                            want_delta, grad, tensors[7], "l2", tensors[8], want_skipped, "reference")
        version = delta._version
        assert bound.repeat(tuple(tensors), grad)
        for got, want in ((stats, want_stats), (delta, want_delta), (tensors[9], want_skipped)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert delta._version > version and not torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize("change", ["another stats tensor", "stats moved", "a missing tensor", "grad dtype",
                                    "grad shape", "grad strided", "switched off"])
def test_a_repeat_refuses_anything_but_the_bound_call_and_writes_nothing(change, monkeypatch):
    bound, tensors = _update_call()
    grad = torch.randn(6, 4)
    if change == "another stats tensor":
        tensors[0] = tensors[0].clone()
    elif change == "stats moved":
        tensors[0].data = tensors[0].clone()  # the same object at another address (what .to() may do)
    elif change == "a missing tensor":
        tensors = tensors[:-1]
    elif change == "grad dtype":
        grad = grad.double()
    elif change == "grad shape":
        grad = torch.randn(6, 5)
    elif change == "grad strided":
        grad = torch.randn(4, 6).t()
    else:
        monkeypatch.setenv("LPA_HOST_KERNELS", "0")
    before = [None if t is None else t.clone() for t in tensors]
    assert not bound.repeat(tuple(tensors), grad)
    for t, b in zip(tensors, before):
        assert t is None or torch.equal(t, b), change


def _method(model, steps: int, host: bool, monkeypatch):
    monkeypatch.setenv("LPA_HOST_KERNELS", "1" if host else "0")
    # single pass: the loss-trend direction and confidence radius (statistics, trend state, update all bound);
    # T steps: the default policy, whose head_pgd_ call at the classifier is bound
    policies = dict(direction="loss_trend", radius="confidence") if steps == 0 else {}
    config = LPAConfig(steps=steps, backend="reference", **policies)
    return build_method("lpa", model, 4, layer="2", config=config, class_counts=torch.tensor([40, 20, 10, 5]))


def _train(method, model, batches, between):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i, (x, y) in enumerate(batches):
        between(i, method, model)
        loss, _ = method.training_loss(x, y)
        opt.zero_grad()
        loss.backward()
        method.after_backward()
        opt.step()
    return method


# single pass: the statistics come from the class-space loss (lpa.head_loss) where it serves, else are bound
BOUND_KERNELS = {(0, True): ("policy_pgd_step",), (0, False): ("class_stats", "policy_pgd_step"),
                 (3, False): ("head_pgd",)}


@pytest.mark.parametrize("between", ["nothing", "reload the state", "delta moved", "classifier weight moved",
                                     "a smaller batch", "norm changed", "steps changed", "mode changed"])
@pytest.mark.parametrize("steps, class_space", [(0, True), (0, False), (3, False)],
                         ids=["single pass", "single pass, perturbed forward", "T=3"])
def test_the_training_step_repeating_its_calls_trains_as_the_pytorch_path(steps, class_space, between, monkeypatch):
    """The training step on the reference backend's CPU tensors, its host calls bound and repeated, against
    the same run on PyTorch ops, with the method's state replaced (or the batch resized) between steps."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    batches = [(torch.randn(9, 5), torch.randint(0, 4, (9,))) for _ in range(6)]
    if between == "a smaller batch":
        batches[3] = (batches[3][0][:5], batches[3][1][:5])

    def replace(i, method, model):
        if i != 3:
            return
        with torch.no_grad():
            if between == "reload the state":
                method.load_state_dict(copy.deepcopy(method.state_dict()))
            elif between == "delta moved":
                perturbation = method.lpa.perturbation
                perturbation.delta.data = perturbation.delta.data.double().float()  # same values, a new address
            elif between == "classifier weight moved":
                model[3].weight.data = model[3].weight.data.double().float()
            elif between == "norm changed":
                method.lpa.norm = "linf"
            elif between == "steps changed" and steps:
                method.lpa.steps = 1
            elif between == "mode changed" and steps:  # (a single-pass site's mode is its perturbation's)
                method.lpa.mode = "scale"

    results = []
    for host in (True, False):
        model = copy.deepcopy(base)
        repeated = []
        if host:
            repeat = _host_ext.BoundCall.repeat

            def counted(self, *args):
                done = repeat(self, *args)
                if done:
                    repeated.append(self.kernel)
                return done
            monkeypatch.setattr(_host_ext.BoundCall, "repeat", counted)
            if not class_space:
                monkeypatch.setattr(head_loss, "CLASSES_SQUARED_PER_SAMPLE", 0)
        method = _train(_method(model, steps, host, monkeypatch), model, batches, replace)
        monkeypatch.undo()
        if host:  # repeated on the batches after the first, but for the one after a change
            for kernel in BOUND_KERNELS[steps, class_space]:
                assert repeated.count(kernel) >= 3, repeated
        results.append((method.delta.clone(), [p.clone() for p in model.parameters()]))
    (delta, params), (want_delta, want_params) = results
    torch.testing.assert_close(delta, want_delta)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want)


def test_a_keyed_call_needs_keys_at_the_bound_addresses():
    """``keyed``: the caller's own tensors (a parameter for the launcher's detach()) stand for the bound ones
    only at the same addresses."""
    bound, tensors = _update_call()
    assert bound.keyed(tuple(t if t is None else t.detach() for t in tensors)) is not None
    assert bound.keyed(tuple(tensors[:-1])) is None
    assert bound.keyed((tensors[0].clone(), *tensors[1:])) is None
    assert bound.keyed((tensors[0], torch.zeros(6), *tensors[2:])) is None  # a tensor where None was bound


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_a_copied_bound_call_never_repeats(copy_by):
    """A copy of a method (deepcopy, torch.save) must not write through the original's addresses."""
    import io

    bound, tensors = _update_call()
    if copy_by == "deepcopy":
        copied, copied_tensors = copy.deepcopy((bound, tensors))
    else:
        buffer = io.BytesIO()
        torch.save((bound, tensors), buffer)
        buffer.seek(0)
        copied, copied_tensors = torch.load(buffer, weights_only=False)
    assert copied.addresses == ()  # bound to nothing: not even tensors that later reuse the original's addresses
    before = [None if t is None else t.clone() for t in tensors]
    assert not copied.repeat(tuple(copied_tensors), torch.randn(6, 4))
    assert not copied.repeat(tuple(tensors), torch.randn(6, 4))
    for t, b in zip(tensors, before):
        assert t is None or torch.equal(t, b)
