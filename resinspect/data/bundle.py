"""The data a run works on: train and test sets plus what models need to know about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["DataBundle", "make_loaders", "dataset_size"]


def dataset_size(ds: Dataset) -> int:
    """The number of items of a map-style dataset (torch's ``Dataset`` type does not promise ``len``; every
    dataset resinspect holds has one)."""
    return len(ds)  # type: ignore[arg-type]


@dataclass
class DataBundle:
    """Train/test datasets yielding ``(image, label)``, with their shape and classes.

    ``task`` (:mod:`resinspect.task`): ``classification`` (the default), or ``next-token`` for a language-model
    dataset, whose items are ``(tokens, next_tokens)`` (two ``(T,)`` long tensors); then ``num_classes`` is the
    vocabulary size, ``image_size`` the context length ``T``, ``in_channels`` 1 and ``class_names`` the tokens.

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
    task: str = "classification"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train_size": dataset_size(self.train),
            "test_size": dataset_size(self.test),
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            **({"task": self.task} if self.task != "classification" else {}),
            **self.info,
        }


class SplitBatches(torch.utils.data.Sampler):
    """This rank's part of each global batch of one process's shuffled order.

    Every epoch draws ``torch.randperm(n, generator)`` exactly as a shuffling DataLoader with that generator
    does, cuts it into global batches of ``batch_size`` and yields the ``rank``-th of ``world_size`` nearly
    equal parts of each (a last global batch with fewer images than ranks is left out, on every rank)."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, generator: torch.Generator):
        self.n, self.batch_size, self.world_size, self.rank, self.generator = n, batch_size, world_size, rank, generator

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.world_size:
                return
            yield torch.tensor_split(batch, self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


def make_loaders(
    data: DataBundle, batch_size: int, seed: int, num_workers: int = 0, dist: Any = None
) -> tuple[DataLoader, DataLoader]:
    """Loaders with a seeded shuffle: the same seed gives the same batch order.

    Under torchrun (``dist`` enabled) the training loader holds this rank's share of every batch
    (:class:`SplitBatches`): the global batches are those of one process with the same seed, in the same
    order, and each rank trains on its ``batch_size / world_size`` images of each. The test loader is the
    whole test set on every rank (analyses shard it)."""
    if dist is not None and dist.enabled:
        from ..errors import ResinspectError

        if batch_size % dist.world_size:
            raise ResinspectError(
                f"--batch-size {batch_size} is not divisible by the {dist.world_size} processes: "
                "the global batch is split evenly across them"
            )
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(
            data.train,
            batch_sampler=SplitBatches(dataset_size(data.train), batch_size, dist.world_size, dist.rank, generator),
            num_workers=num_workers,
            generator=generator,
        )
    else:
        train = DataLoader(
            data.train,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
    test = DataLoader(data.test, batch_size=max(batch_size, 256), shuffle=False, num_workers=num_workers)
    return train, test
