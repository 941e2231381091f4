"""CIFAR-style residual networks (He et al. 2016, §4.2) and their plain twins.

``ResNet(blocks_per_stage=(n, n, n))`` is ResNet-(6n+2): a 3×3 stem with 16
channels, three stages of ``n`` basic blocks with 16/32/64 channels, stride 2
at the first block of stages 2 and 3, global average pooling and a linear
head. ``residual=False`` builds the *plain twin*: the same layers, in the same
order and with the same names, with every shortcut removed (projection
shortcuts included), so the two compare layer for layer.

The seed network of the product's origin document is the same family with
four stages ``(3, 4, 6, 3)`` and widths ``(16, 32, 64, 128)`` for 1×28×28
input: every stage change uses a projection shortcut, so the channel mismatch
of the original sketch cannot happen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Post-activation basic block: ``y = relu(F(x) + shortcut(x))``.

    ``F(x) = bn2(conv2(relu(bn1(conv1(x)))))``. The shortcut is the identity
    when shapes match and a 1×1 convolution + BN (option B) otherwise. With
    ``residual=False`` the block is a plain pair of layers: ``y = relu(F(x))``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module | None = None
        if residual:
            if stride != 1 or in_planes != planes:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A stack of stages of basic blocks with a 3×3 stem and a linear head."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        in_channels: int = 3,
        num_classes: int = 10,
        residual: bool = True,
    ):
        super().__init__()
        if len(blocks_per_stage) != len(widths):
            raise ValueError(f"blocks_per_stage {tuple(blocks_per_stage)} and widths {tuple(widths)} differ in length")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.residual = residual
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=False),
        )
        planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, width, stride=stride, residual=residual))
                planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))
