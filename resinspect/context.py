"""The RunContext every hook receives, and a typed stash for per-plugin state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import DataBundle

__all__ = ["RunContext", "Stash", "StashKey"]

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key: ``KEY = StashKey[MyState]()`` at module level, then ``ctx.stash[KEY] = MyState()``."""

    __slots__ = ()


class Stash:
    """Per-run storage for plugin state, keyed by :class:`StashKey` objects (not strings), so two
    plugins cannot collide and there are no globals."""

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._data[key]

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return self._data.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._data.setdefault(key, default)

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._data

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._data[key]


@dataclass
class RunContext:
    """Everything a plugin may read about the run.

    ``model`` (and ``twin``, the plain twin, when ``--twin`` was given) live on
    ``device``. ``initial_state`` holds CPU copies of each network's weights at
    initialisation, keyed by role (``"model"``, ``"twin"``). ``writer`` is the
    run's TensorBoard ``SummaryWriter`` (tags must start with ``<plugin>/``).
    """

    model: nn.Module
    model_name: str
    data: DataBundle
    train_loader: DataLoader
    test_loader: DataLoader
    device: torch.device
    run_dir: Path
    writer: Any = None
    twin: nn.Module | None = None
    twin_name: str | None = None
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    initial_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    stash: Stash = field(default_factory=Stash)

    def options(self, plugin: str) -> dict[str, Any]:
        """The resolved options of ``plugin`` (defaults, config file, ``-o``)."""
        return dict(self.plugin_options.get(plugin, {}))

    def record_initial_state(self) -> None:
        """Keep CPU copies of every network's current weights as ``initial_state[role]``."""
        for role, m in self.networks():
            self.initial_state[role] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    def test_batches(self, limit: int = 0):
        """Yield ``(x, y)`` test batches on the device, stopping after ``limit`` images (0: all)."""
        seen = 0
        for x, y in self.test_loader:
            if limit and seen + len(y) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            if len(y) == 0:
                break
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            seen += len(y)
            if limit and seen >= limit:
                break

    def train_batches(self, count: int):
        """Yield up to ``count`` training batches on the device (in the loader's order)."""
        for i, (x, y) in enumerate(self.train_loader):
            if i >= count:
                break
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def networks(self) -> list[tuple[str, nn.Module]]:
        """``[("model", model)]`` plus ``("twin", twin)`` when a twin exists."""
        return [("model", self.model)] + ([("twin", self.twin)] if self.twin is not None else [])
