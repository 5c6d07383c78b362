"""Models for ``lpa-train``. Each is ``classifier(features(x))`` with a final ``nn.Linear`` named
``classifier``, so the output of ``features`` (the penultimate features, :data:`DEFAULT_LAYER`) is the
layer where the linear-head fast path of LPA applies; inner layers have dotted names such as
``features.1`` (MLP) or ``features.stage2`` (ResNet)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DEFAULT_LAYER = "features"
# build_model's sizes when --width / --depth are not given: MLP width and hidden layers, ResNet base
# channels and blocks per stage (3: ResNet-20).
MODEL_SIZES = {"mlp": {"width": 128, "depth": 2}, "resnet": {"width": 16, "depth": 3}}


class MLP(nn.Module):
    """``features``: ``depth`` blocks of Linear + ReLU, named ``features.0`` (Linear), ``features.1``
    (ReLU), ...; ``classifier``: Linear(width, num_classes)."""

    def __init__(self, in_features: int, num_classes: int, width: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.flatten(1)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 stem and three stages of ``blocks`` basic
    blocks with ``width``, 2x and 4x channels (``blocks=3``: ResNet-20; ``blocks=5``: ResNet-32). Named
    layers: ``features.stem``, ``features.stage1..3`` (NCHW), ``features.pool`` (the penultimate
    features, ``(B, 4 * width)``), ``classifier``. ``block(in_channels, out_channels, stride)``: the
    residual block (``BasicBlock``, 1x1-projection shortcuts; ``cifar_models.OptionABlock``, option A)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, blocks: int = 3,
                 block: type[nn.Module] = BasicBlock):
        super().__init__()
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()))]
        channels = width
        for s in range(3):
            out = width * 2 ** s
            stage = [block(channels if b == 0 else out, out, 2 if (s > 0 and b == 0) else 1) for b in range(blocks)]
            stages.append((f"stage{s + 1}", nn.Sequential(*stage)))
            channels = out
        stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(dataset, width: int | None = None, depth: int | None = None) -> nn.Module:
    """The default model for a :class:`~lpa_programs.data.Dataset`: ResNet for images, MLP otherwise."""
    if dataset.is_image:
        size = MODEL_SIZES["resnet"]
        return ResNet(dataset.num_classes, dataset.x_train.shape[1], width=width or size["width"],
                      blocks=depth or size["depth"])
    size = MODEL_SIZES["mlp"]
    return MLP(dataset.x_train[0].numel(), dataset.num_classes, width=width or size["width"],
               depth=depth or size["depth"])
