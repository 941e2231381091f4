"""Shattered gradients (Balduzzi et al. 2017): how fast the input gradient decorrelates along a line.

Along a line through input space the gradient of one output (the logit of the class predicted at the line's
start) is computed at M evenly spaced points, all points of a line in a few batches. The correlation
between the gradients at points i and j (Pearson, over the input's dimensions) as a function of |i − j| is
the autocorrelation curve; its decay length is the fraction of the line after which it first falls below
1/e. A linear model has the same gradient everywhere: correlation 1 at every distance.

The paper's own toy: one scalar input, 200 ReLU units per layer, gradients dy/dx at 256 points of [−2, 2]:
a deep plain network's look like white noise, a residual network's like brown noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from resinspect import eval_mode

__all__ = [
    "line_points",
    "input_gradients",
    "correlation_matrix",
    "autocorrelation",
    "decay_length",
    "ToyPlain",
    "ToyResidual",
    "toy_gradients",
    "sequence_autocorrelation",
]


def line_points(start: torch.Tensor, end: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` evenly spaced points from ``start`` to ``end`` (both included): ``[m, *start.shape]``."""
    t = torch.linspace(0, 1, m, device=start.device, dtype=start.dtype).view(-1, *([1] * start.dim()))
    return start.unsqueeze(0) + t * (end - start).unsqueeze(0)


def input_gradients(model: nn.Module, points: torch.Tensor, cls: int, batch: int = 256) -> torch.Tensor:
    """∂ logit_cls / ∂ input at every point, flattened: ``[m, D]`` (eval mode inside)."""
    out = []
    with eval_mode(model), torch.enable_grad():
        for i in range(0, len(points), batch):
            x = points[i : i + batch].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(x)[:, cls].sum(), x)  # samples are independent in eval mode
            out.append(g.flatten(1))
    return torch.cat(out)


def correlation_matrix(grads: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every two points' gradients (over input dimensions): ``[m, m]``."""
    g = grads.double()
    g = g - g.mean(dim=1, keepdim=True)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return g @ g.T


def autocorrelation(corr: torch.Tensor) -> torch.Tensor:
    """Mean correlation of points ``τ`` apart, for ``τ = 0 … m − 1``: the mean of each diagonal."""
    m = corr.shape[0]
    return torch.stack([torch.diagonal(corr, offset=tau).mean() for tau in range(m)])


def decay_length(curve: torch.Tensor) -> float | None:
    """The first lag (as a fraction of the line, 0–1) at which ``curve`` falls below 1/e; None if never."""
    below = (curve < math.exp(-1)).nonzero()
    if len(below) == 0:
        return None
    return float(below[0, 0]) / max(1, len(curve) - 1)


def sequence_autocorrelation(values: torch.Tensor) -> torch.Tensor:
    """Autocorrelation of a 1-D signal (the toy's scalar gradients): ``ρ(τ) = Σ ṽ_i ṽ_{i+τ} / Σ ṽ_i²``."""
    v = values.double() - values.double().mean()
    denom = (v * v).sum().clamp_min(1e-300)
    return torch.stack([(v[: len(v) - tau] * v[tau:]).sum() / denom for tau in range(len(v))])


class ToyPlain(nn.Module):
    """Balduzzi et al.'s feedforward toy: ``depth`` layers of ``width`` units, Linear–BatchNorm–ReLU each,
    then a linear output (scalar in, scalar out by default)."""

    def __init__(self, in_features: int = 1, out_features: int = 1, depth: int = 24, width: int = 200):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class _ToyBlock(nn.Module):
    """Pre-activation block ``x + W·relu(BN(x))``."""

    def __init__(self, width: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(width)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(self.relu(self.bn(x)))


class ToyResidual(nn.Module):
    """The residual toy: a linear stem, ``depth`` pre-activation blocks of ``width`` units, BN–ReLU–linear out."""

    def __init__(self, in_features: int = 1, out_features: int = 1, depth: int = 50, width: int = 200):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.body = nn.Sequential(*[_ToyBlock(width) for _ in range(depth)])
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x.flatten(1))))


def toy_factory(kind: str):
    """A model factory for the registry (input flattened; scalar in and out by default)."""

    def factory(in_channels: int = 1, num_classes: int = 1, image_size: int | None = None) -> nn.Module:
        features = in_channels * (image_size or 1) ** 2
        return ToyPlain(features, num_classes) if kind == "plain" else ToyResidual(features, num_classes)

    return factory


def toy_gradients(model: nn.Module, points: int = 256, low: float = -2.0, high: float = 2.0) -> torch.Tensor:
    """dy/dx of a scalar-in, scalar-out network at ``points`` evenly spaced inputs of [low, high], with
    BatchNorm in training mode over those points, as in the paper (on a copy: the model is not changed)."""
    import copy

    net = copy.deepcopy(model).train()
    x = torch.linspace(low, high, points).unsqueeze(1).requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(net(x).sum(), x)
    return g.squeeze(1).detach()
