"""Direction and radius policies against hand-computed tables (SPEC section 1)."""

import dataclasses
import math

import pytest
import torch

from lpa_kernels.lpa import LPAConfig, build_method
from lpa_kernels.lpa.policy import Policy, class_stats
from tests.lpa.models import batch, mlp

LIKE = torch.zeros((), dtype=torch.float64)


def resolve(stats=None, counts=None, **config):
    policy = Policy(LPAConfig(**config), 4, config.get("eps", 2.0), counts)
    return policy.resolve(stats, LIKE)


def test_frequency_direction_marks_classes_rarer_than_the_median_positive():
    # counts 100, 50, 20, 5: median 35 -> classes 2 and 3 are rarer
    direction, eps = resolve(counts=torch.tensor([100, 50, 20, 5]), direction="frequency", eps=2.0)
    assert direction.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert eps.tolist() == [2.0] * 4, "constant radius must be eps for every class"
    # odd count, the median itself is not rarer than the median
    direction, _ = Policy(LPAConfig(direction="frequency"), 3, 1.0, torch.tensor([10, 5, 1])).resolve(None, LIKE)
    assert direction.tolist() == [-1.0, -1.0, 1.0]


@pytest.mark.parametrize("gamma, expected", [
    (1.0, [0.1, 0.2, 0.5, 2.0]),  # 2 * (n_max / n_c) / 20 = 2 * 5 / n_c
    (0.5, [2 * math.sqrt(0.05), 2 * math.sqrt(0.1), 2 * math.sqrt(0.25), 2.0]),
])
def test_frequency_radius_is_normalised_so_the_rarest_class_gets_eps(gamma, expected):
    _, eps = resolve(counts=torch.tensor([100, 50, 20, 5]), direction="ascent", radius="frequency", gamma=gamma, eps=2.0)
    assert torch.allclose(eps, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def _logits_with_true_probs(pairs, k=4):
    """Logits whose softmax gives probability p to the label and (1 - p) / (k - 1) to the others."""
    rows = []
    for label, p in pairs:
        probs = torch.full((k,), (1 - p) / (k - 1), dtype=torch.float64)
        probs[label] = p
        rows.append(probs.log())
    return torch.stack(rows), torch.tensor([label for label, _ in pairs])


def _hand_table_stats():
    # class means p_c: 0 -> (0.9 + 0.7) / 2 = 0.8, 1 -> 0.2, 2 -> 0.6, 3 absent; thr = 1.6 / 3
    logits, labels = _logits_with_true_probs([(0, 0.9), (0, 0.7), (1, 0.2), (2, 0.6)])
    return class_stats(logits, labels, 4)


def test_confidence_direction_and_linear_radius_from_a_hand_table():
    direction, eps = resolve(_hand_table_stats(), direction="confidence", radius="confidence_linear", eps=2.0)
    assert direction.tolist() == [-1.0, 1.0, -1.0, 0.0], "less confident than average -> +1, more -> -1, absent -> 0"
    # gaps |thr - p_c| = 0.2667, 0.3333, 0.0667 -> divided by the largest (1/3): 0.8, 1.0, 0.2
    assert torch.allclose(eps[:3], torch.tensor([1.6, 2.0, 0.4], dtype=torch.float64), rtol=1e-9)
    assert 0 < eps[3] < 1e-5, "an absent class gets a (positive) vanishing radius"


def test_head_pgd_confidence_rule_treats_a_non_finite_class_as_absent_like_the_policy():
    """head_pgd_'s own confidence rule (lpa_kernels.confidence, from per-sample probabilities) and the
    policy's (from class statistics) agree on a hand table, also when one class holds a NaN sample: that
    class is absent (direction 0) and the threshold is the mean over the other classes present."""
    from lpa_kernels.confidence import confidence_direction

    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    p_true = torch.tensor([0.9, 0.7, 0.2, 0.5, 0.6, float("nan")], dtype=torch.float64)
    direction, _ = confidence_direction(p_true, labels, 4)
    # p_0 = 0.8, p_2 = 0.55 present (class 1 has a NaN sample, class 3 no sample): thr = 0.675
    assert direction.tolist() == [-1.0, 0.0, 1.0, 0.0]
    stats = torch.zeros((3, 4), dtype=torch.float64)
    stats[0].index_add_(0, labels, torch.ones(6, dtype=torch.float64))
    stats[1].index_add_(0, labels, p_true)
    policy_direction, _ = resolve(stats, direction="confidence")
    assert policy_direction.tolist() == direction.tolist()


def test_confidence_radius_is_a_base_plus_a_bonus_normalised_on_each_side_of_the_threshold():
    # thr - p_c = -0.2667 (class 0), +0.3333 (1), -0.0667 (2), absent (3). Above thr (0, 2) the largest gap is
    # 0.2667: scaled 1 and 0.25; below thr class 1 alone: 1. eps * (1 + 0.1 * scaled), absent: the base eps.
    _, eps = resolve(_hand_table_stats(), direction="ascent", radius="confidence", eps=2.0, delta_eps=0.1)
    assert torch.allclose(eps, torch.tensor([2.2, 2.2, 2.05, 2.0], dtype=torch.float64), rtol=1e-9)


# CIFAR-100-LT at 100:1 (n_c = 500 * 0.01 ** (c / 99), floored, as LPL's and LDAM's data code build it)
CIFAR100_LT = [int(500 * 0.01 ** (c / 99)) for c in range(100)]


def _lpl_step_counts(counts, split, head_scale, tail_scale):
    """LPL's get_step (lpl-longtail-100/la_lpl_cifar100.py): an index into its list of PGD steps, i.e. the
    number of steps taken minus one, for classes sorted by decreasing count."""
    return [round(counts[i] / counts[0] * head_scale - 1) if i < split else round(counts[-1] / counts[i] * tail_scale - 1)
            for i in range(len(counts))]


def test_split_direction_and_budget_radius_follow_lpl_on_cifar100_lt():
    config = LPAConfig(direction="split", radius="budget", eps=5.0)  # LPL's defaults: 27 head classes, 10 / 50
    direction, eps = Policy(config, 100, 5.0, torch.tensor(CIFAR100_LT)).resolve(None, LIKE)
    assert direction.tolist() == [-1.0] * 27 + [1.0] * 73, "LPL: the first 27 of 100 classes descend"
    steps = [index + 1 for index in _lpl_step_counts(CIFAR100_LT, 27, 10, 50)]
    assert max(steps) == 50 and steps[0] == 10
    assert torch.allclose(eps, 5.0 * torch.tensor(steps, dtype=torch.float64) / 50, rtol=1e-12)


def test_split_follows_the_class_counts_not_the_index_and_takes_a_fraction_or_an_index():
    counts = torch.tensor([5, 100, 20, 50])  # frequency order: 1, 3, 2, 0
    assert resolve(counts=counts, direction="split", head_classes=2)[0].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert resolve(counts=counts, direction="split", head_fraction=0.25)[0].tolist() == [1.0, -1.0, 1.0, 1.0]
    assert resolve(direction="split", head_classes=1)[0].tolist() == [-1.0, 1.0, 1.0, 1.0], "no counts: by index"
    direction, _ = Policy(LPAConfig(direction="split"), 10, 1.0, None).resolve(None, LIKE)
    assert direction.tolist() == [-1.0] * 4 + [1.0] * 6, "LPL's CIFAR-10-LT split: 4 of 10 descend"
    with pytest.raises(ValueError, match="not both"):
        LPAConfig(head_classes=2, head_fraction=0.5)


def test_budget_radius_with_lpl_cifar10_scales():
    counts = [int(5000 * 0.01 ** (c / 9)) for c in range(10)]
    config = LPAConfig(direction="split", radius="budget", head_budget=6, tail_budget=10)
    _, eps = Policy(config, 10, 1.0, torch.tensor(counts)).resolve(None, LIKE)
    steps = torch.tensor([index + 1 for index in _lpl_step_counts(counts, 4, 6, 10)], dtype=torch.float64)
    assert torch.allclose(eps, steps / steps.max(), rtol=1e-12)


def test_default_step_size_makes_the_radius_bind():
    assert LPAConfig(eps=2.0, steps=4).resolved_step_size == pytest.approx(2.5 * 2.0 / 4)
    config = LPAConfig(eps=2.0, steps=4, radius="confidence", delta_eps=0.2)
    assert config.resolved_step_size == pytest.approx(2.5 * 2.4 / 4)
    assert dataclasses.replace(config, eps=4.0).resolved_step_size == pytest.approx(2.5 * 4.8 / 4), "follows eps"
    assert LPAConfig(eps=2.0, steps=0).resolved_step_size == pytest.approx(0.5)
    assert LPAConfig(lpl_eps=3.0, lpl_steps=5).resolved_lpl_step_size == pytest.approx(1.5)
    assert LPAConfig(step_size=0.1).resolved_step_size == 0.1, "an explicit step size is kept"
    assert LPAConfig().settings_for("lpa")["step_size"] == pytest.approx(2.5 / 3), "settings show the step in force"


def test_a_registered_policy_is_usable_by_name():
    from lpa_kernels.lpa.policies import DIRECTIONS
    from lpa_kernels.lpa.registry import Registry

    registry = Registry("direction")
    registry.add("odd_up", lambda inputs: torch.arange(inputs.num_classes) % 2 * 2.0 - 1, "odd classes ascend")
    with pytest.raises(ValueError, match="registered already"):
        registry.add("odd_up", print, "again")
    assert "odd_up" in registry and list(registry) == ["odd_up"] and "odd classes" in registry.help_text()
    with pytest.raises(ValueError, match="direction must be one of 'odd_up'"):
        registry["nope"]
    entry = registry["odd_up"]
    DIRECTIONS.add(entry.name, entry.value, entry.help)
    try:
        assert resolve(direction="odd_up")[0].tolist() == [-1.0, 1.0, -1.0, 1.0]
    finally:
        DIRECTIONS.remove("odd_up")
    assert "odd_up" not in DIRECTIONS


def test_ascent_descent_and_user_tensor_directions():
    assert resolve(direction="ascent")[0].tolist() == [1.0] * 4
    assert resolve(direction="descent")[0].tolist() == [-1.0] * 4
    user = torch.tensor([1.0, -1.0, 0.5, -0.25])
    assert resolve(direction=user)[0].tolist() == user.tolist()
    with pytest.raises(ValueError, match="direction"):
        resolve(direction=torch.ones(3))


def test_loss_trend_marks_classes_whose_loss_falls_slower_than_average():
    policy = Policy(LPAConfig(direction="loss_trend", trend_momentum=0.5), 3, 1.0, None)
    assert policy.resolve(None, LIKE)[0].tolist() == [0.0, 0.0, 0.0], "no history yet: no direction"
    # (3, K) statistics: counts, sums of p_true (unused here), sums of the cross-entropy; class 2 never seen
    policy.observe(torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [4.0, 2.0, 0.0]]))  # mean losses 2, 2
    policy.observe(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.8, 0.0]]))  # mean losses 1, 1.9
    # running losses 1.5 and 1.95; falls 0.5 * 0.5 = 0.25 and 0.5 * 0.05 = 0.025; mean fall 0.1375
    assert policy.resolve(None, LIKE)[0].tolist() == [-1.0, 1.0, 0.0]


def test_frequency_policies_need_class_counts():
    with pytest.raises(ValueError, match="class_counts"):
        Policy(LPAConfig(direction="frequency"), 4, 1.0, None)
    with pytest.raises(ValueError, match="class_counts"):
        Policy(LPAConfig(radius="frequency"), 4, 1.0, None)


def test_config_rejects_single_pass_with_fresh_init_and_picks_carried_by_default():
    assert LPAConfig(steps=0).init == "carried"
    assert LPAConfig(steps=2).init == "fresh"
    with pytest.raises(ValueError, match="carried"):
        LPAConfig(steps=0, init="fresh")
    with pytest.raises(ValueError, match="direction"):
        LPAConfig(direction="sideways")


@pytest.mark.parametrize("radius, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    # counts 40, 30, 20, 10, one head class (round(0.3 * 4)): steps 10 (head), round(50 * 10 / n_c - 1) + 1 =
    # 17, 25, 50 (tail); radii eps * steps / 50
    ("budget", [0.2, 0.34, 0.5, 1.0]),
])
def test_with_the_default_step_every_class_ends_on_its_radius(radius, expected):
    config = LPAConfig(direction="ascent", radius=radius, head="never")  # eps 1, T = 3, default step
    method = build_method("lpa", mlp(), 4, layer="3", config=config, class_counts=torch.tensor([40, 30, 20, 10]))
    method.training_loss(*batch())
    norms = torch.linalg.vector_norm(method.delta.flatten(1), dim=1)
    assert torch.allclose(norms, torch.tensor(expected, dtype=norms.dtype), rtol=1e-9), "the radius binds"
