"""``trace_split``: the two halves compose to the model, values crossing the cut travel in ``extras``,
the fused-head case is recognised, and bad layers are refused."""

import pytest
import torch
from torch import nn

from lpa_kernels.lpa import Split, trace_split
from tests.lpa.models import NUM_CLASSES, TinyResNet, batch, mlp


@pytest.mark.parametrize("make, layer, features, head", [
    (mlp, "1", (6,), False),
    (mlp, "4", (6,), True),  # the dropout before the classifier: upper is exactly the final Linear
    (TinyResNet, "layer1.0", (3, 8, 8), False),  # inside a stage: the block's skip connection stays whole
    (TinyResNet, "layer1", (3, 8, 8), False),  # a container cut as one call
    (TinyResNet, "avgpool", (3, 8, 8), True),  # upper is fc(flatten(h))
])
def test_lower_then_upper_is_the_model(make, layer, features, head):
    model = make().double().eval()
    x, _ = batch(5, features)
    split = trace_split(model, layer)
    assert isinstance(split, Split)
    h, extras = split.lower(x)
    assert torch.equal(h, model.get_submodule(layer)(_input_of(model, layer, x)))
    torch.testing.assert_close(split.upper(h, *extras), model(x), rtol=0, atol=0)
    assert (split.head is model.get_submodule("5" if make is mlp else "fc")) if head else split.head is None


def _input_of(model, layer, x):
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(x)
    handle.remove()
    return seen[0]


class _SkipOverTheCut(nn.Module):
    """``a`` feeds both the cut layer and the output: its value must cross the cut in ``extras``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return self.fc(self.b(a) + a)


def test_a_value_used_on_both_sides_of_the_cut_travels_in_extras():
    model = _SkipOverTheCut().double()
    x, _ = batch(4)
    split = trace_split(model, "b")
    h, extras = split.lower(x)
    assert len(extras) == 1 and split.head is None
    torch.testing.assert_close(split.upper(h, *extras), model(x), rtol=0, atol=0)
    # the perturbation acts on h only: changing h moves the logits by fc(dh), the carried value untouched
    dh = torch.randn_like(h)
    torch.testing.assert_close(split.upper(h + dh, *extras) - split.upper(h, *extras), dh @ model.fc.weight.T)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(6, 6), nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.lin(self.lin(x)))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else self.fc(-x)  # control flow on a tensor: fx cannot trace it


@pytest.mark.parametrize("model, layer, match", [
    (mlp(), "7", "layer='7' is not a submodule"),
    (mlp(), "", "layer='' is not a submodule"),
    (_Twice(), "lin", "is called 2 times"),
    (_Branchy(), "fc", "torch.fx could not trace the model"),
])
def test_bad_layers_are_refused_with_the_way_out(model, layer, match):
    with pytest.raises(ValueError, match=match):
        trace_split(model, layer)
