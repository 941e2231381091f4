"""Data: bundled (digits, shapes) and file-based (MNIST, FashionMNIST, CIFAR-10, ImageFolder) datasets."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..errors import DataError, UnknownNameError
from .bundle import DataBundle, make_loaders
from .bundled import SHAPE_CLASSES, load_digits, load_shapes, make_shapes
from .files import load_cifar10, load_imagefolder, load_mnist

__all__ = ["DataBundle", "make_loaders", "load_data", "DATASETS", "dataset_names", "make_shapes", "SHAPE_CLASSES"]

DATASETS: dict[str, tuple[Callable[..., DataBundle], str]] = {
    "digits": (load_digits, "scikit-learn's 1,797 real 8×8 handwritten digits, upscaled (bundled, no files)"),
    "shapes": (load_shapes, "generated shapes on noisy backgrounds with ground-truth masks (no files)"),
    "mnist": (lambda **kw: load_mnist(fashion=False, **kw), "MNIST from local IDX files under --data-root"),
    "fashionmnist": (lambda **kw: load_mnist(fashion=True, **kw), "FashionMNIST from local IDX files"),
    "cifar10": (load_cifar10, "CIFAR-10 (python batches) from local files under --data-root"),
    "imagefolder": (load_imagefolder, "images in --data-root/train/<class>/ and test/<class>/"),
}
_FILE_BASED = {"mnist", "fashionmnist", "cifar10", "imagefolder"}
_FILE_ARGS = {"root", "download", "limit_train", "limit_test"}


def dataset_names() -> list[str]:
    return list(DATASETS)


def load_data(name: str, root: str = "data", download: bool = False, **kwargs: Any) -> DataBundle:
    """Load dataset ``name``; ``kwargs`` are the dataset's own arguments (e.g. ``size=16``)."""
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS)
    loader, _ = DATASETS[name]
    if name in _FILE_BASED:
        kwargs = {"root": root, "download": download, **kwargs}
        target = {"mnist": load_mnist, "fashionmnist": load_mnist}.get(name, loader)
        allowed = (set(inspect.signature(target).parameters) - {"fashion"}) | _FILE_ARGS
    else:
        allowed = set(inspect.signature(loader).parameters)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DataError(f"dataset '{name}' has no argument {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(allowed)) or '(none)'}")
    try:
        return loader(**kwargs)
    except (ValueError, TypeError) as e:
        raise DataError(f"dataset '{name}': {e}") from e
