"""The CIFAR networks of the papers LPA is compared with, in ``lpa-train``'s layout (``classifier(features(x))``,
the penultimate features at ``features``, stages at ``features.stage1..3``):

- ``WideResNet`` (Zagoruyko & Komodakis 2016; LPL's balanced CIFAR tables use WRN-28-10 and WRN-16-8):
  pre-activation basic blocks, ``(depth - 4) / 6`` per stage, widths 16k, 32k, 64k, dropout between the
  two convolutions;
- ``OptionABlock`` for ``models.ResNet``: option-A shortcuts (He et al. 2016, section 4.2; ResNet-32 in
  the long-tail work of LDAM-DRW, logit adjustment and LPL): a shape change is a stride-2 subsample
  zero-padded in channels, with no parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from lpa_programs.models import BasicBlock, ResNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3, plus the input (a 1x1 convolution of the activated input
    when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(in_channels), nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(activated)))))
        return out + (x if self.project is None else self.project(activated))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for ``num_classes`` classes; ``depth = 6 n + 4``."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 10, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks, widths = (depth - 4) // 6, [16 * widen, 32 * widen, 64 * widen]
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False))]
        channels = 16
        for s, width in enumerate(widths):
            stage = [PreActBlock(channels if b == 0 else width, width, 2 if (s > 0 and b == 0) else 1, dropout)
                     for b in range(blocks)]
            stages.append((f"stage{s + 1}", nn.Sequential(*stage)))
            channels = width
        stages.append(("pool", nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())))
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PadShortcut(nn.Module):
    """Option A: keep every other pixel and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class OptionABlock(BasicBlock):
    """lpa-train's basic block (conv-BN-ReLU, conv-BN, add, ReLU) with an option-A shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, stride)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(out_channels - in_channels)


# --model choices of lpa-train beyond its default models: name -> builder(num_classes, in_channels)
CIFAR_MODELS = {
    "wrn28-10": lambda k, c: WideResNet(k, 28, 10, dropout=0.3, in_channels=c),  # dropout: LPL's train_lpl.py
    "wrn16-8": lambda k, c: WideResNet(k, 16, 8, dropout=0.3, in_channels=c),
    "resnet32a": lambda k, c: ResNet(k, c, width=16, blocks=5, block=OptionABlock),  # 6 x 5 + 2 layers
}
