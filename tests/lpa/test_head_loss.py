"""The single-pass step's class-space loss at the classifier (``lpa.head_loss``): the host kernels' forward
and backward against the perturbed forward it replaces (float64 reference, the tolerance rule), its
``definition`` and its create_graph backward; then the training step taking it against the same step on
the perturbed forward (class space switched off), and where the step must not take it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_close_to_reference
from lpa_kernels import _host_ext
from lpa_kernels.lpa import LPAConfig, build_method, head_loss
from lpa_kernels.step_update import naive as step_naive

pytestmark = pytest.mark.skipif(not _host_ext.is_built(), reason=_host_ext.unavailable_reason() or "no host kernels")


def _inputs(B, D, K, dtype, seed=0, absent=(), spread=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, D, generator=g, dtype=torch.float64) * spread
    weight = torch.randn(K, D, generator=g, dtype=torch.float64) / D ** 0.5
    bias = torch.randn(K, generator=g, dtype=torch.float64)
    delta = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.3
    allowed = torch.tensor([c for c in range(K) if c not in absent])
    labels = allowed[torch.randint(0, len(allowed), (B,), generator=g)]
    shift = torch.randn(K, generator=g, dtype=torch.float64)
    grad_z = torch.randn(B, K, generator=g, dtype=torch.float64)
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in dict(
        h=h, weight=weight, bias=bias, delta=delta, labels=labels, shift=shift, grad_z=grad_z).items()}


def _perturbed(t, shift, use_logits, grad_scale, class_space):
    """(loss, logits, stats, gradients of h, weight, bias and delta) of the perturbed forward, or of
    ``head_loss.loss`` on the same inputs."""
    h, weight, bias, delta = (t[n].detach().clone().requires_grad_() for n in ("h", "weight", "bias", "delta"))
    labels, K = t["labels"], t["weight"].shape[0]
    shift = t["shift"] if shift else None
    stats = torch.zeros(3, K, dtype=h.dtype)
    if class_space:
        loss, logits = head_loss.loss(F.linear(h, weight, bias), labels, delta, weight, shift, stats, grad_scale)
    else:
        logits = F.linear(h + delta[labels], weight, bias)
        trained = logits if shift is None else logits + shift
        loss = F.cross_entropy(trained, labels)
        step_naive.class_stats_(stats, trained.detach().log_softmax(1), labels, None, accumulate=True)
        delta.register_hook(lambda g: g * grad_scale)
    total = loss + (logits * t["grad_z"]).sum() if use_logits else loss
    total.backward()
    return [loss, logits, stats, h.grad, weight.grad, bias.grad, delta.grad]


NAMES = ("loss", "logits", "stats", "grad h", "grad weight", "grad bias", "grad delta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, D, K, absent", [(7, 13, 3, ()), (33, 5, 6, (1, 4)), (5, 9, 1, ()), (6, 17, 2, (0,)),
                                             (64, 40, 10, (2, 3, 7))])
@pytest.mark.parametrize("shift", [False, True], ids=["ce", "logit-adjusted"])
@pytest.mark.parametrize("use_logits", [False, True], ids=["loss", "loss+logits"])
@pytest.mark.parametrize("spread", [1.0, 400.0], ids=["logits ~1", "logits ~1000: softmax terms underflow"])
def test_host_kernels_equal_the_perturbed_forward(dtype, B, D, K, absent, shift, use_logits, spread):
    t = _inputs(B, D, K, dtype, absent=absent, spread=spread)
    got = _perturbed(t, shift, use_logits, B, class_space=True)
    want64 = _perturbed({n: v.double() if v.is_floating_point() else v for n, v in t.items()}, shift, use_logits, B,
                        class_space=False)
    pytorch = _perturbed(t, shift, use_logits, B, class_space=False)  # PyTorch's own error in this dtype
    for name, g, w, p in zip(NAMES, got, want64, pytorch):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, w, p, what=name)
    if absent:
        assert not got[-1][list(absent)].any(), "an absent class has a zero gradient"


def test_definition_is_the_perturbed_forward():
    t = _inputs(11, 7, 4, torch.float64)
    logits0 = F.linear(t["h"], t["weight"], t["bias"])
    loss, z = head_loss.definition(logits0, t["labels"], t["delta"], t["weight"], t["shift"])
    logits = F.linear(t["h"] + t["delta"][t["labels"]], t["weight"], t["bias"])
    torch.testing.assert_close(z, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, F.cross_entropy(logits + t["shift"], t["labels"]), rtol=1e-12, atol=1e-12)


def _step_gradients(class_space, monkeypatch, x, y, prepare=None, create_graph=False, K=4):
    """The parameters' and delta's gradients after one single-pass training forward at the classifier
    (float64), with class space on or off; ``prepare(model)`` first."""
    monkeypatch.setattr(head_loss, "CLASSES_SQUARED_PER_SAMPLE", 4 if class_space else 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, K)).double()
    if prepare is not None:
        prepare(model)
    method = build_method("lpa", model, K, layer="1", config=LPAConfig(steps=0, backend="reference"))
    with torch.no_grad():
        method.training_loss(x, y)  # makes delta
        method.lpa.perturbation.delta.copy_(torch.randn(K, 12, generator=torch.Generator().manual_seed(3)))
    loss, _ = method.training_loss(x, y)
    params = list(model.parameters()) + [method.lpa.perturbation.live_delta()]
    if create_graph:  # a penalty on the input gradient's norm: second-order terms reach every parameter
        x = x.clone().requires_grad_()
        loss, _ = method.training_loss(x, y)
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + grad_x.square().sum()).backward()
        return [p.grad for p in params]
    return list(torch.autograd.grad(loss, params))


def test_first_and_second_order_gradients_equal_the_perturbed_step(monkeypatch):
    """create_graph=True, then a penalty's backward: every parameter's and delta's gradient as without class
    space (the recorded backward once counted the classifier's own weight gradient twice)."""
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.arange(16) % 4
    for create_graph in (False, True):
        got = _step_gradients(True, monkeypatch, x, y, create_graph=create_graph)
        want = _step_gradients(False, monkeypatch, x, y, create_graph=create_graph)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_row_with_an_infinite_logit_is_all_nan_as_in_the_perturbed_step(monkeypatch):
    """A classifier bias of +inf (a diverged run): loss and every gradient NaN where the perturbed step's are."""
    def diverge(model):
        with torch.no_grad():
            model[2].bias[0] = float("inf")
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])  # class 0 absent
    got = _step_gradients(True, monkeypatch, x, y, diverge)
    want = _step_gradients(False, monkeypatch, x, y, diverge)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-10, atol=1e-12)


def test_a_retained_graph_backpropagates_again_after_the_update(monkeypatch):
    """backward(retain_graph=True), after_backward (delta changed in place), backward again: as without class
    space (the node reads its copy of delta)."""
    results = []
    for class_space in (True, False):
        monkeypatch.setattr(head_loss, "CLASSES_SQUARED_PER_SAMPLE", 4 if class_space else 0)
        model = _mlp(3).double()
        method = build_method("lpa", model, 3, layer="3", config=LPAConfig(steps=0, backend="reference"))
        x, y = torch.randn(10, 6, dtype=torch.float64), torch.arange(10) % 3
        for _ in range(2):
            loss, _ = method.training_loss(x, y)
            loss.backward(retain_graph=True)
            method.after_backward()
            loss.backward()
            method.after_backward()
        results.append([method.delta.clone()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_definition_keeps_absent_classes_out_like_the_kernels():
    """NaN in an absent class's delta row reaches no gradient, in the host node and in ``definition``."""
    t = _inputs(9, 5, 3, torch.float64, absent=(2,))
    t["delta"][2] = float("nan")
    for host in (True, False):
        weight, delta = t["weight"].clone().requires_grad_(), t["delta"].clone().requires_grad_()
        logits0 = F.linear(t["h"], weight, t["bias"])
        loss = (head_loss.loss(logits0, t["labels"], delta, weight, None, None, 9) if host
                else head_loss.definition(logits0, t["labels"], delta, weight))[0]
        loss.backward()
        assert not weight.grad.isnan().any() and not delta.grad.isnan().any(), host
        assert not delta.grad[2].any()


@pytest.mark.parametrize("bad", [-1, 3, 10 ** 6])
def test_a_label_out_of_range_raises_and_writes_nothing(bad):
    t = _inputs(6, 5, 3, torch.float32)
    labels = t["labels"].clone()
    labels[4] = bad
    stats = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, K\)"):
        head_loss.loss(F.linear(t["h"], t["weight"], t["bias"]), labels, t["delta"], t["weight"], None, stats, 6)
    assert not stats.any()


def test_a_hook_changing_the_logits_falls_back_to_the_definition():
    """Logits the kernels do not serve (here a non-contiguous view) take the definition's ops, same result."""
    t = _inputs(8, 5, 3, torch.float32)
    logits0 = F.linear(t["h"], t["weight"], t["bias"])
    odd = logits0.t().contiguous().t()  # same values, column-major
    stats, want_stats = torch.zeros(3, 3), torch.zeros(3, 3)
    got, _ = head_loss.loss(odd, t["labels"], t["delta"], t["weight"], None, stats, 8)
    want, _ = head_loss.loss(logits0, t["labels"], t["delta"], t["weight"], None, want_stats, 8)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stats, want_stats)


# ----- the training step --------------------------------------------------------------------------------


def _mlp(K):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, K))


@pytest.fixture
def counted(monkeypatch):
    """The number of host class-space forwards run so far (a list holding one int)."""
    calls = [0]
    forward = _host_ext.head_loss_forward

    def counting(*args):
        calls[0] += 1
        return forward(*args)
    monkeypatch.setattr(_host_ext, "head_loss_forward", counting)
    return calls


def _train(method, model, batches, micro=1):
    """Steps of ``micro`` micro-batches each (one after_backward per step); the losses and logits seen."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for i in range(0, len(batches), micro):
        opt.zero_grad()
        for x, y in batches[i:i + micro]:
            loss, logits = method.training_loss(x, y)
            (loss * len(y)).backward()
            seen += [loss.detach(), logits.detach()]
        method.after_backward()
        opt.step()
    return seen


SETTINGS = [("lpa", dict()), ("lpa", dict(direction="loss_trend", radius="confidence")), ("la+lpa", dict(tau=1.0)),
            ("lpa", dict(norm="linf", direction="frequency", radius="frequency"))]


@pytest.mark.parametrize("name, settings", SETTINGS, ids=["default", "loss_trend", "logit-adjusted", "linf-frequency"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("micro", [1, 2], ids=["one batch", "two micro-batches"])
def test_the_step_in_class_space_trains_as_the_perturbed_step(name, settings, dtype, micro, counted, monkeypatch):
    K = 4
    batches = [(torch.randn(n, 6, dtype=dtype), torch.randint(0, K, (n,))) for n in (9, 5, 12, 7, 9, 16)]
    results = []
    for class_space in (True, False):
        monkeypatch.setattr(head_loss, "CLASSES_SQUARED_PER_SAMPLE", 4 if class_space else 0)
        model = _mlp(K).to(dtype)
        method = build_method(name, model, K, layer="3", config=LPAConfig(steps=0, backend="reference", **settings),
                              class_counts=torch.tensor([40, 20, 10, 5]))
        seen = _train(method, model, batches, micro)
        results.append((seen, method.delta.clone(), [p.detach().clone() for p in model.parameters()],
                        method.stats()))
        assert counted[0] == len(batches), "every training forward took the class-space loss, none switched off"
    (seen, delta, params, stats), (want_seen, want_delta, want_params, want_stats) = results
    for got, want in zip(seen + [delta] + params, want_seen + [want_delta] + want_params):
        torch.testing.assert_close(got, want)
    assert stats == want_stats


@pytest.mark.parametrize("case", ["K * K > 4 B", "scale mode", "T = 1", "lpa+lpl", "no grad", "autocast",
                                  "host kernels off", "inner layer", "a hook on the classifier"])
def test_the_step_keeps_the_perturbed_forward_where_class_space_does_not_serve(case, counted, monkeypatch):
    K, B = (6, 8) if case == "K * K > 4 B" else (4, 8)
    model = _mlp(K)
    config = dict(steps=0, backend="reference")
    config.update({"scale mode": dict(mode="scale"), "T = 1": dict(steps=1)}.get(case, {}))
    method = build_method("lpa+lpl" if case == "lpa+lpl" else "lpa", model, K,
                          layer="1" if case == "inner layer" else "3", config=LPAConfig(**config))
    if case == "host kernels off":
        monkeypatch.setenv("LPA_HOST_KERNELS", "0")
    if case == "a hook on the classifier":
        model[4].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x, y = torch.randn(B, 6), torch.randint(0, K, (B,))
    if case == "no grad":
        with torch.no_grad():
            method.training_loss(x, y)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            method.training_loss(x, y)
    else:
        method.training_loss(x, y)[0].backward()
        method.after_backward()
    assert counted[0] == 0


def test_the_step_in_class_space_with_a_frozen_classifier(counted):
    """A classifier without a gradient: delta and the layers below still train, the classifier stays."""
    model = _mlp(3)
    model[4].requires_grad_(False)
    frozen = copy.deepcopy(model[4].state_dict())
    method = build_method("lpa", model, 3, layer="3", config=LPAConfig(steps=0, backend="reference"))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    method.training_loss(x, y)[0].backward()
    assert counted[0] == 1
    assert model[4].weight.grad is None and model[0].weight.grad is not None
    method.after_backward()
    assert method.delta.abs().sum() > 0
    assert all(torch.equal(v, frozen[k]) for k, v in model[4].state_dict().items())
