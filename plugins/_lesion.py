"""Lesion sweeps: evaluate a model with sets of residual blocks switched off, streaming the test set.

A *lesion* is ``(mode, blocks)``: ``mode`` is ``"bypass"`` (y = shortcut(x)),
``"drop_skip"`` (y = branch(x)) or ``"identity"`` (the whole module replaced
by the identity: used for the plain twin's layer pairs). Results are sums
(count, correct, loss sum) accumulated per batch.

The fast sweep shares work between lesions (Veit et al.'s single-block study
needs N passes over the data): per batch it runs one clean pass that caches
every block's output, then, for a lesion whose first switched block is ``j``,
*replays* the cached outputs of blocks ``0..j-1`` instead of computing them.
Blocks ``j..N-1`` are computed as usual, so the results equal the naive
sweep's exactly, while an N-block single-lesion sweep computes about half the
block forward passes. Memory holds one batch's activations per block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resinspect import bypass, cross_entropy, drop_skip, forwards_replaced, on_forward

__all__ = ["Lesion", "LesionStats", "lesion_sweep", "identity_replaced", "applied_lesion"]


@dataclass(frozen=True)
class Lesion:
    mode: str
    blocks: tuple[int, ...]


@dataclass
class LesionStats:
    count: int = 0
    correct: int = 0
    loss_sum: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


class _Sums:
    """Device-side sums for many lesions; moved to the host once at the end."""

    def __init__(self, n: int, device: torch.device):
        self.correct = torch.zeros(n, dtype=torch.long, device=device)
        self.loss = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, i: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.correct[i] += (logits.argmax(-1) == y).sum()
        self.loss[i] += cross_entropy(logits, y, reduction="sum").double()

    def result(self) -> list[LesionStats]:
        return [LesionStats(self.count, int(c), float(s)) for c, s in zip(self.correct.tolist(), self.loss.tolist())]


def identity_replaced(modules: Sequence[nn.Module]):
    """Context manager: each module returns its input unchanged."""
    return forwards_replaced((m, _identity) for m in modules)


def _identity(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x


def _replaying(modules: Sequence[nn.Module], outputs: Sequence[torch.Tensor | None]):
    """Context manager: each module returns its cached output instead of computing it."""
    return forwards_replaced((m, (lambda *a, _out=out, **k: _out)) for m, out in zip(modules, outputs))


@contextmanager
def applied_lesion(model: nn.Module, blocks: Sequence, lesion: Lesion) -> Iterator[None]:
    chosen = [blocks[i] for i in lesion.blocks]
    if lesion.mode == "bypass":
        with bypass(model, chosen):
            yield
    elif lesion.mode == "drop_skip":
        with drop_skip(model, chosen):
            yield
    elif lesion.mode == "identity":
        with identity_replaced([b.module if hasattr(b, "module") else b for b in chosen]):
            yield
    else:
        raise ValueError(f"unknown lesion mode '{lesion.mode}'; valid: bypass, drop_skip, identity")


def _module(b) -> nn.Module:
    return b.module if hasattr(b, "module") else b


@torch.no_grad()
def lesion_sweep(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    blocks: Sequence,
    lesions: Sequence[Lesion],
    fast: bool = True,
) -> tuple[LesionStats, list[LesionStats]]:
    """Evaluate the clean model and every lesion on the same batches.

    ``blocks`` are :class:`~resinspect.anatomy.ResidualBlock` objects (or plain
    modules for ``identity`` lesions) in forward order. Returns
    ``(clean, [stats per lesion])``. The model must be in eval mode; it is left
    exactly as it was.
    """
    clean_sums: Any = None
    sums: Any = None
    modules = [_module(b) for b in blocks]
    for x, y in batches:
        if sums is None:
            sums, clean_sums = _Sums(len(lesions), x.device), _Sums(1, x.device)
        if fast:
            cache: list[torch.Tensor | None] = [None] * len(modules)
            with on_forward([(str(i), m) for i, m in enumerate(modules)], _store(cache)):
                logits = model(x)
        else:
            logits = model(x)
        clean_sums.add(0, logits, y)
        for i, lesion in enumerate(lesions):
            with ExitStack() as stack:
                if fast and lesion.blocks:
                    first = min(lesion.blocks)
                    stack.enter_context(_replaying(modules[:first], cache[:first]))
                stack.enter_context(applied_lesion(model, blocks, lesion))
                sums.add(i, model(x), y)
        sums.count += y.numel()
        clean_sums.count += y.numel()
    if sums is None:
        raise ValueError("lesion_sweep: no batches to evaluate")
    return clean_sums.result()[0], sums.result()


def _store(cache: list):
    def keep(name: str, module: nn.Module, inputs, output) -> None:
        cache[int(name)] = output

    return keep
