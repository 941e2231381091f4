"""Loss surfaces around trained weights along filter-normalised random directions (Li, Xu, Taylor, Studer &
Goldstein 2018), evaluated without copying the model per point.

A direction has one random tensor per parameter; each filter (each slice along the output dimension) of a
weight's direction is rescaled to the norm of the same filter of the weight, and the directions of
one-dimensional parameters (BatchNorm scales and shifts, biases) are zero — the paper's ``ignore=biasbn``.
BatchNorm runs in evaluation mode with its running statistics. Grid points are independent. By default
they are evaluated one after another with the weights stepped in place (no copy of the model per point);
with ``chunk > 1`` several go through the network at once (``torch.func.functional_call`` under ``vmap``:
one forward with a batch of weight sets), which on two CPU cores is slower (the activations of many
weight sets no longer fit in cache: 66–127 against 51–57 ms per point for resnet20 on 256 digits images)
but is the way to fill a GPU. A network ``vmap`` cannot run falls back to stepping. The weights are
restored bit for bit afterwards, also after an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from resinspect import cross_entropy


def filter_normalised_direction(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One random direction for ``params``: Gaussian, each filter scaled to its weight filter's norm; zero for
    one-dimensional parameters."""
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(len(p), -1).norm(dim=1)
            n = d.reshape(len(d), -1).norm(dim=1)
            d.mul_((w / (n + 1e-10)).view(-1, *([1] * (p.dim() - 1))))
        out.append(d)
    return out


@contextmanager
def kept(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The parameters' values, restored bit for bit on exit (also after an error)."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in params], saved)


@dataclass
class Evaluation:
    """Mean loss and accuracy at each point: ``[points]`` each."""

    loss: torch.Tensor
    accuracy: torch.Tensor


class Surface:
    """Loss (cross-entropy) and accuracy of ``model`` on fixed ``batches`` at points w + Σ_k c_k d_k."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        directions: Sequence[Sequence[torch.Tensor]],
        chunk: int = 1,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sub_batch: int = 64,
    ):
        self.model = model
        self.names = [n for n, p in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.moving = [i for i, p in enumerate(self.params) if any(bool(d[i].any()) for d in directions)]
        self.directions = directions
        # sub-batches small enough for the activations to stay in cache (on two CPU cores 64 images of
        # 16×16 are 10% faster per point than 256), channels-last for the convolutions
        self.batches = [
            (
                x[i : i + sub_batch].contiguous(memory_format=torch.channels_last)
                if x.dim() == 4
                else x[i : i + sub_batch],
                y[i : i + sub_batch],
            )
            for x, y in batches
            for i in range(0, len(y), sub_batch)
        ]
        self.count = sum(y.numel() for _, y in batches)
        self.chunk = chunk
        self.loss_fn = loss_fn or (lambda out, y: cross_entropy(out, y, reduction="sum"))
        self.vectorised = chunk > 1

    def evaluate(self, coords: torch.Tensor) -> Evaluation:
        """``coords`` ``[points, len(directions)]``; the model must be in eval mode."""
        with kept(self.params) as w0, torch.inference_mode():
            if self.vectorised:
                try:
                    return self._batched(coords, w0)
                except Exception:  # a forward vmap cannot run (data-dependent control flow, in-place ops…)
                    self.vectorised = False
            return self._stepped(coords, w0)

    def _point(self, w0: list[torch.Tensor], c: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in self.moving:
            w = w0[i].clone()
            for k, d in enumerate(self.directions):
                w.add_(d[i], alpha=float(c[k]))
            out.append(w)
        return out

    def _stepped(self, coords: torch.Tensor, w0: list[torch.Tensor]) -> Evaluation:
        losses, accs = [], []
        targets = [self.params[i].detach() for i in self.moving]
        for c in coords:
            torch._foreach_copy_(targets, self._point(w0, c))
            loss, correct = 0.0, 0
            for x, y in self.batches:
                out = self.model(x)
                loss += float(self.loss_fn(out, y))
                correct += int((out.argmax(-1) == y).sum())
            losses.append(loss / self.count)
            accs.append(correct / self.count)
        return Evaluation(torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64))

    def _batched(self, coords: torch.Tensor, w0: list[torch.Tensor]) -> Evaluation:
        fixed = {n: p.detach() for n, p in zip(self.names, self.params)}
        fixed.update({n: b for n, b in self.model.named_buffers()})
        moving = [self.names[i] for i in self.moving]
        dirs = [torch.stack([d[i] for d in self.directions]) for i in self.moving]  # [K, *shape]
        base = [w0[i] for i in self.moving]

        def forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**fixed, **weights}, (x,))

        batched = vmap(forward, in_dims=(0, None))
        losses, accs = [], []
        for lo in range(0, len(coords), self.chunk):
            c = coords[lo : lo + self.chunk].to(base[0].dtype).to(base[0].device)  # [P, K]
            weights = {n: b.unsqueeze(0) + torch.tensordot(c, d, dims=1) for n, b, d in zip(moving, base, dirs)}
            loss = torch.zeros(len(c), dtype=torch.float64, device=c.device)
            correct = torch.zeros(len(c), dtype=torch.long, device=c.device)
            for x, y in self.batches:
                out = batched(weights, x)  # [P, B, outputs]
                loss += torch.stack([self.loss_fn(o, y) for o in out]).double()
                correct += (out.argmax(-1) == y).flatten(1).sum(1)
            losses.append(loss.cpu() / self.count)
            accs.append(correct.cpu().double() / self.count)
        return Evaluation(torch.cat(losses), torch.cat(accs))


def grid(resolution: int, span: float = 1.0) -> torch.Tensor:
    """The coordinates of ``resolution`` evenly spaced values on [−span, span]."""
    return torch.linspace(-span, span, resolution, dtype=torch.float64)


def nonconvexity(surface: torch.Tensor) -> float:
    """Share of the interior (point, axis) pairs of a 2-D grid where the second finite difference along that
    axis is negative."""
    dx = surface[2:, 1:-1] - 2 * surface[1:-1, 1:-1] + surface[:-2, 1:-1]
    dy = surface[1:-1, 2:] - 2 * surface[1:-1, 1:-1] + surface[1:-1, :-2]
    return float(((dx < 0).sum() + (dy < 0).sum()) / (2 * dx.numel()))


def rise(xs: torch.Tensor, curve: torch.Tensor, radius: float) -> float:
    """Mean loss at ±radius along a 1-D curve minus the loss at 0 (interpolated)."""
    import numpy as np

    x, y = xs.numpy(), curve.numpy()
    return float((np.interp(radius, x, y) + np.interp(-radius, x, y)) / 2 - np.interp(0.0, x, y))
