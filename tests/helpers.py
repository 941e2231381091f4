"""Small models for tests."""

import torch
from torch import nn


class UserBlock(nn.Module):
    """A residual block as a user would write it: nothing registered anywhere."""

    def __init__(self, width: int):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                               nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.f(x)


class UserResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[UserBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def user_resnet(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return UserResNet(in_channels, num_classes)


def plain_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """No residual block anywhere."""
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


from resinspect.testing import hook_count, overridden_forwards  # noqa: E402,F401
