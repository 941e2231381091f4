"""Data: bundled (digits, shapes) and file-based (MNIST, FashionMNIST, CIFAR-10, ImageFolder) datasets."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import DataError, UnknownNameError
from .bundle import DataBundle, make_loaders
from .bundled import SHAPE_CLASSES, load_digits, load_shapes, make_shapes
from .files import load_cifar10, load_imagefolder, load_mnist
from .tokens import load_induction, load_text

__all__ = [
    "DataBundle",
    "make_loaders",
    "load_data",
    "DATASETS",
    "DatasetRegistry",
    "dataset_names",
    "make_shapes",
    "SHAPE_CLASSES",
]

DATASETS: dict[str, tuple[Callable[..., DataBundle], str]] = {
    "digits": (load_digits, "scikit-learn's 1,797 real 8×8 handwritten digits, upscaled (bundled, no files)"),
    "shapes": (load_shapes, "generated shapes on noisy backgrounds with ground-truth masks (no files)"),
    "mnist": (lambda **kw: load_mnist(fashion=False, **kw), "MNIST from local IDX files under --data-root"),
    "fashionmnist": (lambda **kw: load_mnist(fashion=True, **kw), "FashionMNIST from local IDX files"),
    "cifar10": (load_cifar10, "CIFAR-10 (python batches) from local files under --data-root"),
    "imagefolder": (load_imagefolder, "images in --data-root/train/<class>/ and test/<class>/"),
    "induction": (load_induction, "language modelling: random tokens repeated (the period drawn per sequence)"),
    "text": (load_text, "language modelling: bytes of a local UTF-8 file or folder of .txt files (--data-root)"),
}
_FILE_BASED = {"mnist", "fashionmnist", "cifar10", "imagefolder", "text"}
_FILE_ARGS = {"root", "download", "limit_train", "limit_test"}


_SOURCES: dict[str, str] = {name: "resinspect" for name in DATASETS}


class DatasetRegistry:
    """What ``resinspect_register_datasets(registry)`` receives: ``registry.add(name, loader, description)``."""

    def __init__(self, plugin: str):
        self.plugin = plugin

    def add(self, name: str, loader: Callable[..., DataBundle], description: str) -> None:
        """Register ``loader(**dataset_args) -> DataBundle`` as dataset ``name`` (``--data name``; the
        arguments come from ``--data-arg KEY=VALUE`` and the config's ``[data]`` table)."""
        source = _SOURCES.get(name)
        if source is not None and source != f"plugin {self.plugin}":
            raise ValueError(f"plugin {self.plugin}: dataset name '{name}' is already registered by {source}")
        if not callable(loader):
            raise TypeError(f"plugin {self.plugin}: the loader of dataset '{name}' is not callable")
        DATASETS[name] = (loader, description)
        _SOURCES[name] = f"plugin {self.plugin}"


def dataset_source(name: str) -> str:
    return _SOURCES.get(name, "resinspect")


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
        raise DataError(
            f"dataset '{name}' has no argument {', '.join(unknown)}; valid: {', '.join(sorted(allowed)) or '(none)'}"
        )
    try:
        bundle = loader(**kwargs)
    except (ValueError, TypeError) as e:
        raise DataError(f"dataset '{name}': {e}") from e
    if not isinstance(bundle, DataBundle):
        raise DataError(f"dataset '{name}': its loader returned {type(bundle).__name__}, not a DataBundle")
    return bundle
