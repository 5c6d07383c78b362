"""Small models for the controller tests: an MLP and a tiny torchvision-style ResNet."""

import torch
import torch.nn.functional as F
from torch import nn

from lpa_programs.models import BasicBlock  # the residual block of lpa-train's CIFAR ResNet

NUM_CLASSES = 4


def mlp(dtype=torch.float64, dropout=0.0) -> nn.Sequential:
    """``0`` Linear, ``1`` ReLU, ``2`` Linear, ``3`` ReLU, ``4`` Dropout, ``5`` Linear classifier."""
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(7, NUM_CLASSES)).to(dtype)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def batch(size=10, features=(6,), dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *features, generator=gen, dtype=dtype)
    y = torch.arange(size) % NUM_CLASSES
    return x, y[torch.randperm(size, generator=gen)]


class TinyTransformer(nn.Module):
    """One pre-norm transformer block over ``(B, T, 6)`` inputs, mean-pooled into a linear head."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.embed(x)
        q = self.norm1(x)
        x = x + self.attn(q, q, q, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))
