"""What an analysis costs, counted in the model's own multiply-adds, so that caps are the same on every
machine (a time budget would make the same command study different things on a laptop and on a GPU).

:func:`multiply_adds` counts one image's multiply-adds in every ``Conv``/``Linear`` layer (the layers that
dominate CNNs and transformers; ``nn.MultiheadAttention`` is counted whole, projections and both matrix
products), by
one forward pass with hooks. :class:`ComputePlan` lets an analysis fit its optional, faster-than-linear
parts into the run's ``--compute`` budget and say what it cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .probes import is_linear, linear_weight

__all__ = ["multiply_adds", "ComputePlan"]


@torch.no_grad()
def multiply_adds(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds per image of ``model`` on inputs shaped like ``example`` (a batch; counted on its first
    image): each convolution ``out.numel() · in_channels/groups · kernel size``, each linear layer
    ``out.numel() · in_features`` (transformers' ``Conv1D`` too), each ``nn.MultiheadAttention``
    ``4 · L · E²`` for its four projections plus ``2 · L² · E`` for its scores and mixing."""
    total = [0]

    def conv(m: Any, inputs: tuple, out: torch.Tensor) -> None:  # an nn.Conv1d/2d/3d
        total[0] += out[:1].numel() * (int(m.in_channels) // int(m.groups)) * math.prod(m.kernel_size)

    def linear(m: Any, inputs: tuple, out: torch.Tensor) -> None:  # nn.Linear, or transformers' Conv1D
        total[0] += out[:1].numel() * int(linear_weight(m).shape[1])

    def attention(m: Any, inputs: tuple, out: tuple) -> None:
        q = inputs[0]
        length = q.shape[0] if not getattr(m, "batch_first", False) else q.shape[1]
        e = int(m.embed_dim)  # q/k/v and output projections (their weights are used directly, not as modules)
        total[0] += 4 * length * e * e + 2 * length * length * e

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv))
        elif is_linear(m):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention))
    was_training = model.training
    try:
        model.eval()
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total[0])


@dataclass
class ComputePlan:
    """An analysis's passes over its images, fitted to a budget of multiply-adds.

    ``per_pass``: multiply-adds of one pass over the images (``multiply_adds · images``); ``budget``: the
    run's ``--compute`` (0: no budget). ``spend(what, passes)`` books work the analysis always does;
    ``fits(passes)`` says whether optional work still fits (and books it when it does); ``cut(text)``
    records what was left out, for the section's finding."""

    per_pass: float
    budget: float
    spent: float = 0.0
    cuts: list[str] = field(default_factory=list)
    unit: str = "image"  # what one input is, for the finding (a language model's: "sequence")

    def spend(self, passes: float) -> None:
        self.spent += passes * self.per_pass

    def fits(self, passes: float) -> bool:
        if self.budget and self.spent + passes * self.per_pass > self.budget:
            return False
        self.spend(passes)
        return True

    def most(self, passes_each: float, wanted: int) -> int:
        """How many of ``wanted`` optional units of ``passes_each`` passes fit (booking them)."""
        if not self.budget:
            self.spend(passes_each * wanted)
            return wanted
        room = max(0.0, self.budget - self.spent) / max(passes_each * self.per_pass, 1e-300)
        n = min(wanted, int(room))
        self.spend(passes_each * n)
        return n

    def cut(self, text: str) -> None:
        self.cuts.append(text)

    def finding(self, macs_per_image: int, images: int) -> str | None:
        if not self.cuts:
            return None
        per_pass = f", {self.per_pass:.3g} per pass over the {images:,} {self.unit}s" if images > 1 else ""
        return (
            f"Fitted to the compute budget (--compute {self.budget:.3g} multiply-adds; this model does "
            f"{macs_per_image:.3g} per {self.unit}{per_pass}): "
            + "; ".join(self.cuts)
            + ". Pass --compute 0 (no budget) or a larger one for the full study."
        )
