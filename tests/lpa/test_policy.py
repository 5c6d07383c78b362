"""Direction and radius policies against hand-computed tables (SPEC section 1)."""

import math

import pytest
import torch

from lpa_kernels.lpa import LPAConfig
from lpa_kernels.lpa.policy import Policy, class_stats

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


def test_confidence_direction_and_radius_from_a_hand_table():
    # class means p_c: 0 -> (0.9 + 0.7) / 2 = 0.8, 1 -> 0.2, 2 -> 0.6, 3 absent; thr = 1.6 / 3
    logits, labels = _logits_with_true_probs([(0, 0.9), (0, 0.7), (1, 0.2), (2, 0.6)])
    stats = class_stats(logits, labels, 4)
    direction, eps = resolve(stats, direction="confidence", radius="confidence", eps=2.0)
    assert direction.tolist() == [-1.0, 1.0, -1.0, 0.0], "less confident than average -> +1, more -> -1, absent -> 0"
    # gaps |thr - p_c| = 0.2667, 0.3333, 0.0667 -> divided by the largest (1/3): 0.8, 1.0, 0.2
    assert torch.allclose(eps[:3], torch.tensor([1.6, 2.0, 0.4], dtype=torch.float64), rtol=1e-9)
    assert 0 < eps[3] < 1e-5, "an absent class gets a (positive) vanishing radius"


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
