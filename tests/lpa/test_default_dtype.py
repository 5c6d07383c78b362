"""Everything the training methods run works when the user sets ``torch.set_default_dtype(torch.float64)``
(tensors the library creates without an explicit dtype would then disagree with float32 activations)."""

import pytest
import torch

from lpa_kernels.confidence import confidence_direction
from lpa_kernels.lpa import METHODS, LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, batch, mlp


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_confidence_rule_on_float32_probabilities(float64_default):
    p_true = torch.tensor([0.9, 0.7, 0.2, 0.6], dtype=torch.float32)
    direction, magnitude = confidence_direction(p_true, torch.tensor([0, 0, 1, 2]), 4)
    assert direction.tolist() == [-1.0, 1.0, -1.0, 0.0]
    assert direction.dtype == magnitude.dtype == torch.float32, "float32 in, float32 (compute dtype) out"


CASES = ([(name, "1", "confidence", "confidence") for name in METHODS]
         # layer "4" feeds the classifier: LPA's fused head path
         + [("la+lpa+lpl", "4", direction, radius) for direction, radius in (("split", "budget"), ("loss_trend", "frequency"))])


@pytest.mark.parametrize("name, layer, direction, radius", CASES)
def test_every_method_trains_in_float32_under_a_float64_default(float64_default, name, layer, direction, radius):
    model = mlp(dtype=torch.float32)
    method = build_method(name, model, NUM_CLASSES, layer=layer,
                          config=LPAConfig(steps=1, direction=direction, radius=radius),
                          class_counts=torch.arange(1, NUM_CLASSES + 1) * 10)
    x, y = batch(dtype=torch.float32)
    for _ in range(2):
        loss, logits = method.training_loss(x, y)
        loss.backward()
        method.after_backward()
    assert torch.isfinite(loss) and loss.dtype == logits.dtype == torch.float32
    for delta in (getattr(method, "delta", None), getattr(method, "logit_delta", None)):
        assert delta is None or delta.dtype == torch.float32
