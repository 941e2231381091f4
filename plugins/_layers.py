"""Whole transformer layers as the unit of a lesion (Lad et al. 2024): deleting a layer bypasses every residual
site it holds (attention and MLP), swapping two adjacent layers runs each one's computation in the other's
place."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from resinspect import forwards_replaced
from resinspect_plugins._lesion import LesionStats, _Sums

__all__ = ["layer_groups", "swapped", "swap_sweep", "layered"]


def layer_groups(blocks: Sequence) -> list[tuple[str, tuple[int, ...]]]:
    """``(layer, indices of its blocks)`` in forward order: the modules that hold the residual sites."""
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(b.layer, []).append(i)
    return [(layer, tuple(idx)) for layer, idx in groups.items()]


def layered(blocks: Sequence, language: bool) -> bool:
    """Whether the layer study applies: two or more layers, and layers that hold several sites (a transformer)
    or a language model."""
    groups = layer_groups(blocks)
    return len(groups) > 1 and (language or any(len(idx) > 1 for _, idx in groups))


@contextmanager
def swapped(model: nn.Module, first: str, second: str) -> Iterator[None]:
    """Layers ``first`` and ``second`` exchange their computations (each module keeps its name and hooks); the
    model is restored on exit."""
    a, b = model.get_submodule(first), model.get_submodule(second)
    fa, fb = a.forward, b.forward
    with forwards_replaced([(a, fb), (b, fa)]):
        yield


@torch.no_grad()
def swap_sweep(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pairs: Sequence[tuple[str, str]]
) -> list[LesionStats | None]:
    """Accuracy and loss (per prediction) of ``model`` with each pair of layers swapped, on the same batches;
    None for a pair that cannot be swapped (their shapes differ: layers of different stages)."""
    sums = None
    possible = [True] * len(pairs)
    for x, y in batches:
        sums = sums or _Sums(len(pairs), x.device)
        for i, (p, q) in enumerate(pairs):
            if not possible[i]:
                continue
            try:
                with swapped(model, p, q):
                    out = model(x)
            except RuntimeError:  # shape mismatch: the pair does not fit in each other's place
                possible[i] = False
                continue
            sums.add(i, out, y)
        sums.count += y.numel()
    if sums is None:
        raise ValueError("swap_sweep: no batches to evaluate")
    return [st if ok else None for st, ok in zip(sums.result(), possible)]
