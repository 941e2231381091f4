"""Datasets that need no download: scikit-learn's digits and the generated ``shapes``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .bundle import DataBundle

__all__ = ["load_digits", "make_shapes", "load_shapes", "SHAPE_CLASSES"]

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")


def load_digits(size: int = 16, test_size: int = 397) -> DataBundle:
    """scikit-learn's 1,797 real 8×8 handwritten digits, upscaled to ``size``×``size``.

    The train/test split is fixed (a permutation seeded with 0), independent
    of the run's seed, so every run is scored on the same test images.
    Pixels are standardised with the training set's mean and std.
    """
    from sklearn.datasets import load_digits as sk_digits

    if not 8 <= size <= 64:
        raise ValueError(f"digits: size must be between 8 and 64, got {size}")
    raw = sk_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = order[:test_size], order[test_size:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return DataBundle(
        name="digits",
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        in_channels=1,
        image_size=size,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        info={"size": size, "test_size": test_size, "source": "sklearn.datasets.load_digits"},
    )


def make_shapes(
    count: int, size: int = 32, seed: int = 0, noise: float = 0.08
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate ``count`` RGB images of shapes on noisy backgrounds.

    Returns ``(images, labels, masks)``: images ``(N, 3, size, size)`` in [0, 1],
    labels ``(N,)`` indexing :data:`SHAPE_CLASSES`, masks ``(N, size, size)``
    bool, True on the object's pixels. The same seed gives the same data.
    """
    if size < 12:
        raise ValueError(f"shapes: size must be at least 12, got {size}")
    if count < 1:
        raise ValueError(f"shapes: count must be positive, got {count}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_CLASSES), count)
    radius = rng.uniform(0.18, 0.32, count) * size
    cx = rng.uniform(radius, size - 1 - radius)
    cy = rng.uniform(radius, size - 1 - radius)
    grid = np.arange(size, dtype=np.float64)
    dx = (grid[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    dy = (grid[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    r2 = dx**2 + dy**2
    ax, ay = np.abs(dx), np.abs(dy)
    candidates = np.stack(
        [
            r2 <= 1.0,  # circle
            np.maximum(ax, ay) <= 0.8,  # square
            (dy <= 0.8) & (ax <= 0.55 * (dy + 1.0)),  # triangle (apex up)
            ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95)),  # cross
            (r2 <= 1.0) & (r2 >= 0.4),  # ring
        ]
    )
    masks = candidates[labels, np.arange(count)]
    background = rng.uniform(0.0, 0.4, (count, 3, 1, 1))
    colour = rng.uniform(0.55, 1.0, (count, 3, 1, 1))
    images = background + masks[:, None] * (colour - background)
    images = images + rng.normal(0.0, noise, images.shape)
    images = np.clip(images, 0.0, 1.0)
    return (
        torch.tensor(images, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(masks, dtype=torch.bool),
    )


def load_shapes(size: int = 32, train_count: int = 1600, test_count: int = 400, seed: int = 0) -> DataBundle:
    """The ``shapes`` dataset: train and test generated from disjoint seeds; test masks kept."""
    x_train, y_train, _ = make_shapes(train_count, size, seed=2 * seed)
    x_test, y_test, m_test = make_shapes(test_count, size, seed=2 * seed + 1)
    return DataBundle(
        name="shapes",
        train=TensorDataset((x_train - 0.5) / 0.25, y_train),
        test=TensorDataset((x_test - 0.5) / 0.25, y_test),
        in_channels=3,
        image_size=size,
        num_classes=len(SHAPE_CLASSES),
        class_names=list(SHAPE_CLASSES),
        test_masks=m_test,
        info={"size": size, "train_count": train_count, "test_count": test_count, "seed": seed},
    )
