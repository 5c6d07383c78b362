"""The logit-adjusted loss and its combinations with LPA and LPL, against closed forms worked out by hand.

The case: two classes with training counts 3 and 1 (prior 0.75 / 0.25, tau = 1), one sample of class 1
whose layer output is h = 0, an identity classifier (logits = h), one ascent step of size s = 0.5 inside
a radius 1 that does not bind. The adjusted logits are a = log([0.75, 0.25]), softmax [0.75, 0.25]:

- la: CE = -log 0.25 = log(1 + 3).
- One L2 ascent step (LPA on h or LPL on the logits) moves along (p - onehot) / ||.|| = [1, -1] / sqrt 2,
  i.e. by c = s / sqrt 2 on each logit with opposite signs: p_0 / p_1 = 3 e^{2c}, CE = log(1 + 3 e^{2c}).
- LPA then LPL: the second step has the same direction, so CE = log(1 + 3 e^{4c}).
- Without the adjustment (lpa): CE = log(1 + e^{2c}).
"""

import math

import pytest
import torch
from torch import nn

from lpa_kernels.lpa import LPAConfig, build_method

C = 0.5 / math.sqrt(2)
EXPECTED = {
    "la": math.log(1 + 3),
    "la+lpa": math.log(1 + 3 * math.exp(2 * C)),
    "la+lpl": math.log(1 + 3 * math.exp(2 * C)),
    "la+lpa+lpl": math.log(1 + 3 * math.exp(4 * C)),
    "lpa": math.log(1 + math.exp(2 * C)),
}


def identity_classifier(dtype=torch.float64) -> nn.Sequential:
    linear = nn.Linear(2, 2).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
        linear.bias.zero_()
    return nn.Sequential(nn.Identity(), linear)


# LPA's PGD by autograd ("never") and by the fused head path ("always", the shift folded into the bias)
CASES = [(name, "never") for name in EXPECTED] + [(name, "always") for name in EXPECTED if "lpa" in name.split("+")]


@pytest.mark.parametrize("name, head", CASES)
def test_loss_matches_the_hand_computed_case(name, head):
    model = identity_classifier()
    config = LPAConfig(direction="ascent", eps=1.0, step_size=0.5, steps=1, lpl_eps=1.0, lpl_step_size=0.5,
                       lpl_steps=1, head=head)
    method = build_method(name, model, 2, layer="0", config=config, class_counts=torch.tensor([3, 1]))
    x, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1])
    loss, logits = method.training_loss(x, y)
    assert loss.item() == pytest.approx(EXPECTED[name], rel=1e-12, abs=0)
    assert logits.shape == (1, 2)
    model.eval()
    assert torch.equal(model(x), torch.zeros(1, 2, dtype=torch.float64)), "evaluation reads the unadjusted logits"


def test_la_methods_force_the_loss_and_show_it_in_their_settings():
    config = LPAConfig()
    assert config.loss == "ce" and config.for_method("la+lpl").loss == "la"
    assert config.settings_for("la+lpl")["loss"] == "la" and "tau" in config.settings_for("la+lpl")
    assert "loss" not in config.settings_for("lpl")
    assert LPAConfig(loss="la", tau=0.5).settings_for("erm") == {"loss": "la", "tau": 0.5}


def test_the_loss_option_adjusts_any_method_and_tau_scales_the_shift():
    model = identity_classifier()
    x, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1])
    method = build_method("erm", model, 2, layer="0", config=LPAConfig(loss="la", tau=2.0),
                          class_counts=torch.tensor([3, 1]))
    # a = 2 log([0.75, 0.25]): p_1 = 1 / (1 + 9)
    assert method.training_loss(x, y)[0].item() == pytest.approx(math.log(10), rel=1e-12)


def test_mixup_reads_the_adjusted_logits():
    model = identity_classifier()
    method = build_method("mixup", model, 2, layer="0", config=LPAConfig(loss="la"), class_counts=torch.tensor([3, 1]))
    x, y = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1, 1])  # mixing equal samples changes nothing
    assert method.training_loss(x, y)[0].item() == pytest.approx(math.log(4), rel=1e-12)


@pytest.mark.parametrize("counts, match", [(None, "class_counts"), (torch.tensor([3, 0]), "> 0")])
def test_la_needs_positive_class_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        build_method("la", identity_classifier(), 2, layer="0", class_counts=counts)
    with pytest.raises(ValueError, match="loss"):
        LPAConfig(loss="focal")
