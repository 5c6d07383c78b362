"""The controller around the PGD: model splitting, call counts, eval mode, LPL, baselines, diagnostics."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpa_kernels.lpa import METHODS, LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, TinyResNet, TinyTransformer, batch, mlp


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_lower_network_runs_once_per_training_step(steps):
    model = mlp()
    first_layer_calls = count_calls(model[0])
    method = build_method("lpa", model, NUM_CLASSES, layer="3", config=LPAConfig(steps=steps, head="never"))
    for seed in (1, 2):
        x, y = batch(seed=seed)
        loss, _ = method.training_loss(x, y)
        loss.backward()
        method.after_backward()
    assert len(first_layer_calls) == 2, f"lower network ran {len(first_layer_calls)} times in 2 steps (T={steps})"
    stats = method.stats()
    assert stats["lower_forwards"] == 2 and stats["training_steps"] == 2
    assert stats["upper_forwards"] == 2 * (steps + 1), "upper runs once per PGD step plus the training forward"
    assert stats["pgd_steps"] == 2 * max(steps, 1)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_leaves_the_eval_model_unchanged(name):
    model = mlp(dropout=0.3)
    x, y = batch()
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    first_layer_calls = count_calls(model[0])
    counts = torch.arange(1, NUM_CLASSES + 1)  # the "la" methods' prior
    method = build_method(name, model, NUM_CLASSES, layer="1", config=LPAConfig(steps=0 if name == "lpa" else 2),
                          class_counts=counts)
    for _ in range(2):
        loss, logits = method.training_loss(x, y)
        assert logits.shape == (len(y), NUM_CLASSES) and torch.isfinite(loss), f"{name}: bad loss or logits"
        loss.backward()
        method.after_backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), f"{name}: weights got no gradient"
    assert len(first_layer_calls) == 2, f"{name}: lower network ran {len(first_layer_calls)} times in 2 steps"
    if "lpa" in name.split("+"):
        assert method.delta.abs().sum() > 0, "delta did not move"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before), f"{name}: the model's eval output changed without a weight update"
        h, extras = method.split.lower(x)
        assert torch.equal(method.split.upper(h, *extras), before), "upper(lower(x)) differs from model(x)"


def test_lpl_combined_with_lpa_moves_both_deltas_and_lpl_follows_the_logit_gradient():
    model = mlp()
    x, y = batch()
    config = LPAConfig(steps=2, lpl_steps=1, lpl_step_size=0.1, lpl_eps=1.0, direction="ascent")
    method = build_method("lpa+lpl", model, NUM_CLASSES, layer="3", config=config)
    loss, logits = method.training_loss(x, y)
    assert method.delta.abs().sum() > 0, "LPA delta did not move"
    assert method.logit_delta.shape == (NUM_CLASSES, NUM_CLASSES)
    # one ascent L2 step from 0 on the logits: 0.1 * g_c / ||g_c|| with g_c = sum over class c of softmax - onehot
    g = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64).index_add_(
        0, y, logits.detach().softmax(1) - F.one_hot(y, NUM_CLASSES))
    expected = 0.1 * g / g.norm(dim=1, keepdim=True)
    assert torch.allclose(method.logit_delta, expected, rtol=1e-10, atol=1e-12), "LPL delta differs from the logit-gradient step"
    assert torch.allclose(loss, F.cross_entropy(logits + expected[y], y), rtol=1e-12), "loss must include LPL's offset"


def test_resnet_attaches_inside_a_block_with_the_skip_connection_crossing_the_cut():
    torch.manual_seed(0)
    model = TinyResNet().double()
    x, y = batch(size=8, features=(3, 6, 6))
    stem_calls = count_calls(model.conv1)
    for layer, delta_shape, shape in (("layer1.1.bn1", "channel", (NUM_CLASSES, 4, 1, 1)),
                                      ("layer2.0", "full", (NUM_CLASSES, 6, 3, 3))):
        method = build_method("lpa", model, NUM_CLASSES, layer=layer, config=LPAConfig(steps=2, delta_shape=delta_shape))
        model.eval()
        with torch.no_grad():
            h, extras = method.split.lower(x)
            assert torch.equal(method.split.upper(h, *extras), model(x)), f"{layer}: split changes the model"
        model.train()
        tracked = model.layer2[0].bn2.num_batches_tracked.item()
        del stem_calls[:]
        loss, _ = method.training_loss(x, y)
        loss.backward()
        assert len(stem_calls) == 1, f"{layer}: stem ran {len(stem_calls)} times"
        assert method.delta.shape == shape and method.delta.abs().sum() > 0
        assert model.layer2[0].bn2.num_batches_tracked.item() == tracked + 1, \
            "PGD steps must not update BatchNorm running statistics"
    crossing = build_method("lpa", model, NUM_CLASSES, layer="layer1.1.bn1").split.lower(x)[1]
    assert len(crossing) == 1, "the block input (skip connection) must cross the cut"


def test_transformer_block_attaches_inside_its_mlp_with_a_last_dim_delta():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    x, y = batch(size=6, features=(5, 6))
    embed_calls = count_calls(model.embed)
    method = build_method("lpa", model, NUM_CLASSES, layer="mlp.1", config=LPAConfig(steps=2, delta_shape="last"))
    loss, _ = method.training_loss(x, y)
    loss.backward()
    assert len(embed_calls) == 1 and method.stats()["upper_forwards"] == 3
    assert method.delta.shape == (NUM_CLASSES, 1, 16) and method.delta.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        h, extras = method.split.lower(x)
        assert len(extras) == 1, "the residual stream must cross the cut"
        assert torch.equal(method.split.upper(h, *extras), model(x)), "split changes the transformer"


@pytest.mark.parametrize("steps, head", [(0, "auto"), (2, "always"), (2, "never")])
def test_bf16_autocast_keeps_a_float32_delta(steps, head):
    model = mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    method = build_method("lpa+lpl", model, NUM_CLASSES, layer="4", config=LPAConfig(steps=steps, head=head))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = method.training_loss(x, y)
    loss.backward()
    method.after_backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert method.delta.dtype == torch.float32 and torch.isfinite(method.delta).all() and method.delta.abs().sum() > 0


def test_explicit_lower_upper_when_tracing_fails():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(6, 5).double(), nn.Linear(5, NUM_CLASSES).double()

        def forward(self, x):
            h = self.body(x)
            return self.head(h if h.sum() > 0 else -h)  # data-dependent: not traceable

    model = Branchy()
    with pytest.raises(ValueError, match="lower= and upper="):
        build_method("lpa", model, NUM_CLASSES, layer="body")
    method = build_method("lpa", model, NUM_CLASSES, lower=model.body, upper=model.head,
                          config=LPAConfig(steps=2, head="always"))
    x, y = batch()
    loss, _ = method.training_loss(x, y)
    loss.backward()
    assert method.delta.abs().sum() > 0 and method.stats()["lower_forwards"] == 1


def test_unknown_layer_tuple_output_and_unknown_method_are_rejected():
    with pytest.raises(ValueError, match="not a submodule"):
        build_method("lpa", mlp(), NUM_CLASSES, layer="7")
    method = build_method("lpa", TinyTransformer().double(), NUM_CLASSES, layer="attn")
    with pytest.raises(ValueError, match="one tensor"):
        method.training_loss(*batch(size=4, features=(5, 6)))
    with pytest.raises(ValueError, match="name must be one of"):
        build_method("sgd", mlp(), NUM_CLASSES, layer="1")


def _recording_method(name, config):
    """A method on an explicit split whose upper records the activations it is given."""
    model = mlp()
    seen = []

    def upper(h):
        seen.append(h.detach().clone())
        return model[2:](h)

    return build_method(name, model, NUM_CLASSES, lower=model[:2], upper=upper, config=config), model, seen


def test_adversarial_baseline_moves_every_activation_by_adv_eps():
    method, model, seen = _recording_method("adv", LPAConfig(adv_eps=0.05))
    x, y = batch()
    method.training_loss(x, y)
    probe, trained = seen
    moved = (trained - probe).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.05, dtype=torch.float64), rtol=1e-12)
    assert (moved > 0).float().mean() > 0.5, "FGSM should move most coordinates"


def test_dropout_and_noise_baselines_perturb_as_documented():
    x, y = batch(size=400)
    method, model, seen = _recording_method("dropout", LPAConfig(dropout_p=0.25))
    method.training_loss(x, y)
    h = model[:2](x)
    kept = seen[0] != 0
    assert torch.allclose(seen[0][kept], h[kept] / 0.75, rtol=1e-12), "kept activations are scaled by 1 / (1 - p)"
    dropped = ((seen[0] == 0) & (h != 0)).sum() / (h != 0).sum()
    assert 0.18 < dropped < 0.32, f"dropped fraction {dropped:.3f} is far from p = 0.25"
    method, model, seen = _recording_method("noise", LPAConfig(noise_std=0.2))
    method.training_loss(x, y)
    std = (seen[0] - model[:2](x)).std()
    assert 0.18 < std < 0.22, f"noise std {std:.3f} is far from 0.2"


def test_manifold_mixup_mixes_activations_and_targets_with_one_lambda():
    method, model, seen = _recording_method("mixup", LPAConfig(mixup_alpha=1.0))
    x, y = batch(size=6)
    loss, logits = method.training_loss(x, y)
    h, mixed = model[:2](x).detach(), seen[0]
    # recover lambda and the partner of each sample: mixed_i = lam * h_i + (1 - lam) * h_j
    i = next(i for i in range(6) if not torch.allclose(mixed[i], h[i]))
    fits = []
    for j in range(6):
        if j != i:
            lam = torch.dot(mixed[i] - h[j], h[i] - h[j]) / (h[i] - h[j]).square().sum()
            fits.append(((lam * h[i] + (1 - lam) * h[j] - mixed[i]).norm(), lam))
    lam = min(fits, key=lambda f: f[0])[1]
    partners = [min(range(6), key=lambda j: (lam * h[k] + (1 - lam) * h[j] - mixed[k]).norm()) for k in range(6)]
    assert sorted(partners) == list(range(6)), "partners must form a permutation"
    assert torch.allclose(mixed, lam * h + (1 - lam) * h[partners], rtol=1e-9, atol=1e-12), "one lambda for the batch"
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[partners])
    assert torch.allclose(loss, expected, rtol=1e-9), "mixup loss must mix the two targets' cross-entropies"


def test_manifold_mixup_refuses_an_alpha_that_rounds_to_zero_also_after_torch_compile(monkeypatch):
    """Beta(alpha, alpha) with alpha below float32's range: torch.compile switches distributions' default
    argument checks off for the whole process, after which the sample was NaN and the loss NaN, silently.
    Refused when the method is built."""
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", False)  # what torch.compile leaves
    with pytest.raises(ValueError, match=r"mixup_alpha=1e-300 rounds to 0 in torch's default dtype"):
        build_method("mixup", mlp(), NUM_CLASSES, layer="2", config=LPAConfig(mixup_alpha=1e-300))


def test_diagnostics_report_expansion_per_class_for_a_known_delta():
    model = mlp()
    x, y = batch()
    method = build_method("lpa", model, NUM_CLASSES, layer="2", config=LPAConfig(steps=0, mode="scale"))
    method.training_loss(x, y)  # creates delta
    with torch.no_grad():
        method.delta.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2], dtype=torch.float64)[:, None].expand(-1, 7))
    counts = method.stats()
    report = method.diagnostics(x, y)
    h = model[:3](x).detach()
    scale = 1 + method.delta[y]
    ratio = (h * scale).norm(dim=1) / h.norm(dim=1)
    for c, factor in enumerate([1.5, 0.5, 1.0, 1.2]):
        assert torch.allclose(ratio[y == c], torch.tensor(factor, dtype=torch.float64))
    assert report["expansive_fraction"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(report["norm_ratio"], torch.tensor([1.5, 0.5, 1.0, 1.2], dtype=torch.float64))
    moved = (h * scale - h).norm(dim=1)
    with torch.no_grad():
        amplification = ((model[3:](h * scale) - model[3:](h)).norm(dim=1)[moved > 0] / moved[moved > 0]).mean()
    assert abs(report["amplification"] - float(amplification)) < 1e-10
    assert method.stats() == counts, "diagnostics must not count as training"


def test_diagnostics_do_not_change_a_carried_delta():
    x, y = batch()
    method = build_method("lpa", mlp(), NUM_CLASSES, layer="1", config=LPAConfig(steps=2, init="carried"))
    method.training_loss(x, y)
    delta = method.delta.clone()
    report = method.diagnostics(x, y)
    assert torch.equal(method.delta, delta), "diagnostics ran PGD on the carried delta itself"
    assert report["expansive_fraction"].shape == (NUM_CLASSES,)


def test_diagnostics_keep_each_modules_mode_and_create_no_state():
    x, y = batch()
    model = mlp(dropout=0.5)
    method = build_method("lpa", model, NUM_CLASSES, layer="1", config=LPAConfig(steps=2, init="carried"))
    model[4].eval()  # a frozen submodule of a training model
    keys = set(method.state_dict())
    method.diagnostics(x, y)  # before the first training batch
    assert model.training and not model[4].training, "diagnostics changed a module's train/eval mode"
    assert set(method.state_dict()) == keys, "diagnostics created state (delta) before the first batch"
    method.training_loss(x, y)
    assert method.delta is not None


@pytest.mark.parametrize("name, steps", [("lpa+lpl", 3), ("lpa", 0), ("erm", None)])
def test_int32_labels_train_as_int64_labels(name, steps):
    x, y = batch()
    losses = []
    for labels in (y, y.int()):
        torch.manual_seed(0)
        config = None if steps is None else LPAConfig(steps=steps, lpl_steps=max(steps, 1))
        method = build_method(name, mlp(), NUM_CLASSES, layer="3", config=config)
        loss, _ = method.training_loss(x, labels)
        loss.backward()
        method.after_backward()
        delta = getattr(method, "delta", None)
        losses.append((loss.detach(), None if delta is None else delta.clone()))
    assert torch.equal(losses[0][0], losses[1][0])
    assert (losses[0][1] is None) == (losses[1][1] is None)
    assert losses[0][1] is None or torch.equal(losses[0][1], losses[1][1])


def test_state_dict_round_trip_restores_the_carried_deltas():
    x, y = batch()
    config = LPAConfig(steps=0, lpl_steps=0)
    trained = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=config)
    loss, _ = trained.training_loss(x, y)
    loss.backward()
    trained.after_backward()
    state = trained.state_dict()
    assert {"lpa.delta", "lpl.delta"} <= set(state) and state["lpa.delta"].abs().sum() > 0
    restored = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3", config=config)
    restored.load_state_dict(state)
    assert torch.equal(restored.delta, trained.delta) and torch.equal(restored.logit_delta, trained.logit_delta)
    with pytest.raises(ValueError, match="unexpected key 'lpl.delta'"):
        build_method("lpa", mlp(), NUM_CLASSES, layer="3").load_state_dict(state)


@pytest.mark.parametrize("field, value, message", [
    ("backend", "gpu", "backend must be one of 'auto', 'reference', 'triton', 'cuda'; got 'gpu'"),
    ("mode", "multiply", "mode must be one of"),
    ("norm", "l1", "norm must be one of"),
    ("eps", 0.0, "eps must be a finite number > 0"),
    ("eps", float("nan"), "eps must be a finite number > 0"),
    ("step_size", -0.1, "step_size must be a finite number >= 0"),
    ("tau", float("inf"), "tau must be a finite number >= 0"),
    ("adv_eps", float("inf"), "adv_eps must be a finite number >= 0"),
    ("noise_std", float("inf"), "noise_std must be a finite number >= 0"),
    ("head_budget", float("inf"), "head_budget must be a finite number >= 1"),
    ("direction", torch.tensor([5.0, 1.0, -1.0, 0.0]), "direction must be in [-1.0, 1.0] and finite"),
    ("direction", torch.tensor([float("nan"), 1.0, 1.0, 1.0]), "direction must be in [-1.0, 1.0] and finite"),
    ("direction", torch.ones(2, 2), "direction must be a policy name or a (K,) tensor"),
    ("steps", -1, "steps must be an int >= 0"),
    ("head_classes", -2, "head_classes must be an int >= 0"),
    ("dropout_p", 1.0, "dropout_p must be a finite number in [0, 1)"),
    ("trend_momentum", -0.5, "trend_momentum must be a finite number in [0, 1)"),
    ("head", "sometimes", "head must be one of"),
])
def test_config_is_validated_on_construction_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LPAConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("eps", "1", "eps must be a number > 0, got str '1'"),
    ("steps", 1.5, "steps must be an int >= 0, got float 1.5"),
    ("steps", True, "steps must be an int >= 0, got bool True"),
    ("head_classes", 2.0, "head_classes must be an int >= 0, got float 2.0"),
    ("mode", None, "mode must be one of 'add', 'scale'; got None"),
    ("backend", 1, "backend must be one of"),
])
def test_config_fields_of_the_wrong_type_raise_type_error(field, value, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        LPAConfig(**{field: value})


def test_num_classes_is_checked_against_the_final_linear():
    model = mlp()  # its last layer is nn.Linear(7, NUM_CLASSES)
    for kwargs in (dict(layer="3"), dict(layer="5"), dict(lower=model[:5], upper=model[5])):  # "5": the classifier
        with pytest.raises(ValueError, match=f"num_classes={NUM_CLASSES + 1} but the model's final nn.Linear "
                                             f"has out_features={NUM_CLASSES}"):
            build_method("lpa", model, NUM_CLASSES + 1, **kwargs)
    ends_in_softmax = nn.Sequential(mlp(), nn.LogSoftmax(dim=1))
    build_method("erm", ends_in_softmax, NUM_CLASSES + 1, layer="0.3")  # no final Linear found: not checked


def test_methods_print_their_name_layer_and_the_settings_they_use():
    model = mlp()
    lpa = build_method("lpa", model, NUM_CLASSES, layer="3", config=LPAConfig(eps=0.5))
    text = repr(lpa)
    assert text.startswith("ClassPerturbationMethod('lpa', layer='3', num_classes=4, mode='add'") and "eps=0.5" in text
    assert "dropout_p" not in text and "object at 0x" not in text
    x, y = batch()
    lpa.training_loss(x, y)
    assert f"delta={(NUM_CLASSES, 7)}" in repr(lpa), "the learned delta's shape is shown once it exists"
    assert repr(build_method("dropout", model, NUM_CLASSES, layer="3")) == \
        "Dropout('dropout', layer='3', num_classes=4, dropout_p=0.1)"


def test_head_always_needs_pgd_steps():
    with pytest.raises(ValueError, match=re.escape("head='always' needs steps >= 1")):
        LPAConfig(steps=0, head="always")
