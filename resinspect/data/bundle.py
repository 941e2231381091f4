"""The data a run works on: train and test sets plus what models need to know about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataBundle", "make_loaders"]


@dataclass
class DataBundle:
    """Train/test datasets yielding ``(image, label)``, with their shape and classes.

    ``test_masks`` (``(N, H, W)`` bool, aligned with ``test``) is set for
    datasets with ground-truth object masks (``shapes``).
    """

    name: str
    train: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    num_classes: int
    class_names: list[str]
    test_masks: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "train_size": len(self.train), "test_size": len(self.test),
                "in_channels": self.in_channels, "image_size": self.image_size,
                "num_classes": self.num_classes, **self.info}


def make_loaders(data: DataBundle, batch_size: int, seed: int, num_workers: int = 0
                 ) -> tuple[DataLoader, DataLoader]:
    """Loaders with a seeded shuffle: the same seed gives the same batch order."""
    train = DataLoader(data.train, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(data.test, batch_size=max(batch_size, 256), shuffle=False, num_workers=num_workers)
    return train, test
