"""Datasets read from local files in their standard formats: MNIST, FashionMNIST, CIFAR-10, ImageFolder.

Nothing is downloaded unless ``download=True``; missing files give a
:class:`DataError` that says where the files are expected. CIFAR-10's python
batches are pickles: they are read with an unpickler that admits only numpy
arrays and plain data, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from .bundle import DataBundle, dataset_size

__all__ = ["load_mnist", "load_cifar10", "load_imagefolder", "CIFAR10Files"]

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
_MEANS = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _limit(ds: Dataset, n: int | None) -> Dataset:
    return Subset(ds, range(min(n, dataset_size(ds)))) if n else ds


def _download_failed(name: str, folder: Path, files: tuple[str, ...], e: Exception) -> DataError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return DataError(
        f"{name}: download failed ({type(e).__name__}: {first}); without network, put the files "
        f"{', '.join(files)} in {folder}"
    )


def load_mnist(
    root: str | Path = "data",
    download: bool = False,
    fashion: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataBundle:
    """MNIST or FashionMNIST from ``root/<MNIST|FashionMNIST>/raw`` (unpacked IDX files)."""
    from torchvision import datasets, transforms

    cls = datasets.FashionMNIST if fashion else datasets.MNIST
    name = cls.__name__
    root = Path(root)
    raw = root / name / "raw"
    missing = [f for f in _MNIST_FILES if not (raw / f).exists()]
    if missing and not download:
        raise DataError(
            f"{name}: files not found in {raw}: missing {', '.join(missing)} "
            "(the unpacked IDX files). Put them there, or pass --download"
        )
    mean, std = _MEANS[name]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        train = cls(str(root), train=True, download=download, transform=tf)
        test = cls(str(root), train=False, download=download, transform=tf)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError/URLError/ValueError
        if download:
            raise _download_failed(name, raw, _MNIST_FILES, e) from e
        raise DataError(f"{name}: cannot read the files in {raw}: {e}") from e
    classes = list(train.classes)
    return DataBundle(
        name=name.lower(),
        train=_limit(train, limit_train),
        test=_limit(test, limit_test),
        in_channels=1,
        image_size=28,
        num_classes=len(classes),
        class_names=classes,
        info={"root": str(root)},
    )


class _ArraysOnly(pickle.Unpickler):
    _allowed = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain data")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"CIFAR-10: {path} is not a valid CIFAR-10 python batch: {e}") from e


class CIFAR10Files(Dataset):
    """CIFAR-10 python batches under ``root/cifar-10-batches-py``, read without executing code."""

    def __init__(self, root: str | Path, train: bool = True, transform=None):
        folder = Path(root) / _CIFAR_DIR
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        data, labels = [], []
        for n in names:
            batch = _read_batch(folder / n)
            try:
                data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch.get("labels", batch.get("fine_labels", [])))
            except (KeyError, ValueError) as e:
                raise DataError(f"CIFAR-10: {folder / n}: unexpected contents ({e})") from e
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # NHWC like torchvision
        self.targets = [int(t) for t in labels]
        if len(self.targets) != len(self.data):
            raise DataError(f"CIFAR-10: {folder}: {len(self.data)} images but {len(self.targets)} labels")
        meta = _read_batch(folder / "batches.meta")
        self.classes = list(meta.get("label_names", []))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def load_cifar10(
    root: str | Path = "data", download: bool = False, limit_train: int | None = None, limit_test: int | None = None
) -> DataBundle:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (the python version of the dataset)."""
    from torchvision import transforms

    root = Path(root)
    folder = root / _CIFAR_DIR
    missing = [f for f in _CIFAR_FILES if not (folder / f).exists()]
    if missing and download:
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001
            raise _download_failed("CIFAR-10", folder, _CIFAR_FILES, e) from e
        missing = []
    if missing:
        raise DataError(
            f"CIFAR-10: files not found in {folder}: missing {', '.join(missing)} "
            "(the python version, cifar-10-python.tar.gz unpacked). Put them there, or pass --download"
        )
    mean, std = _MEANS["CIFAR10"]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train, test = CIFAR10Files(root, True, tf), CIFAR10Files(root, False, tf)
    return DataBundle(
        name="cifar10",
        train=_limit(train, limit_train),
        test=_limit(test, limit_test),
        in_channels=3,
        image_size=32,
        num_classes=10,
        class_names=train.classes or [str(i) for i in range(10)],
        info={"root": str(root)},
    )


def load_imagefolder(
    root: str | Path = "data",
    image_size: int = 32,
    grayscale: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
    download: bool = False,
) -> DataBundle:
    """Images in ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val``). A folder with only
    ``test/`` or ``val/`` is an evaluation-only dataset: its evaluation images stand in as the training set
    (``info["evaluation_only"]``), which is enough to analyse a trained model with ``--epochs 0`` (runs that
    would train on it are refused)."""
    from torchvision import datasets, transforms

    root = Path(root)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise DataError(
            f"imagefolder: expected {root}/train/<class>/... and {root}/test/<class>/... (or val/), or only "
            f"test/ or val/ to evaluate a trained model; not found"
        )
    train_dir = root / "train" if (root / "train").is_dir() else test_dir
    steps = [transforms.Resize((image_size, image_size))]
    if grayscale:
        steps.append(transforms.Grayscale(1))
    steps += [
        transforms.ToTensor(),
        transforms.Normalize((0.5,) * (1 if grayscale else 3), (0.5,) * (1 if grayscale else 3)),
    ]
    tf = transforms.Compose(steps)
    try:
        train = datasets.ImageFolder(str(train_dir), transform=tf)
        test = datasets.ImageFolder(str(test_dir), transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"imagefolder: {e}") from e
    if train.classes != test.classes:
        raise DataError(f"imagefolder: train classes {train.classes} differ from test classes {test.classes}")
    return DataBundle(
        name="imagefolder",
        train=_limit(train, limit_train),
        test=_limit(test, limit_test),
        in_channels=1 if grayscale else 3,
        image_size=image_size,
        num_classes=len(train.classes),
        class_names=list(train.classes),
        info={"root": str(root), **({"evaluation_only": True} if train_dir == test_dir else {})},
    )
