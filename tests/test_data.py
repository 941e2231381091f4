import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from resinspect.data import SHAPE_CLASSES, load_data, make_shapes
from resinspect.errors import DataError, UnknownNameError


def test_digits_is_the_real_sklearn_set_with_a_fixed_split():
    a, b = load_data("digits"), load_data("digits")
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert a.train.tensors[0].shape[1:] == (1, 16, 16)
    assert sorted(a.test.tensors[1].unique().tolist()) == list(range(10))
    # standardised with the training set's statistics
    assert abs(a.train.tensors[0].mean().item()) < 1e-4 and abs(a.train.tensors[0].std().item() - 1) < 1e-3


def test_shapes_deterministic_for_a_seed_and_masks_mark_the_object():
    x1, y1, m1 = make_shapes(64, size=24, seed=3)
    x2, y2, m2 = make_shapes(64, size=24, seed=3)
    x3, _, _ = make_shapes(64, size=24, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (64, 3, 24, 24) and m1.shape == (64, 24, 24)
    assert set(y1.tolist()) <= set(range(len(SHAPE_CLASSES)))
    # every image has an object, and the object differs in colour from the background on average
    area = m1.flatten(1).float().mean(1)
    assert (area > 0.02).all() and (area < 0.6).all()
    inside = (x1 * m1[:, None]).sum((2, 3)) / m1[:, None].sum((2, 3))
    outside = (x1 * ~m1[:, None]).sum((2, 3)) / (~m1[:, None]).sum((2, 3))
    assert ((inside - outside).abs().max(1).values > 0.1).all()


def test_shapes_bundle_keeps_test_masks_aligned():
    d = load_data("shapes", size=16, train_count=20, test_count=10, seed=1)
    assert d.test_masks.shape == (10, 16, 16) and len(d.test) == 10 and d.num_classes == len(SHAPE_CLASSES)


def test_unknown_dataset_and_argument():
    with pytest.raises(UnknownNameError, match="did you mean 'shapes'"):
        load_data("shape")
    with pytest.raises(DataError, match="no argument colour"):
        load_data("shapes", colour=1)
    with pytest.raises(DataError, match="size must be at least 12"):
        load_data("shapes", size=4)


def _idx(path, array, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_style_loaders_read_real_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    train_y, test_y = np.arange(12) % 10, np.arange(5)
    _idx(raw / "train-images-idx3-ubyte", train_x)
    _idx(raw / "train-labels-idx1-ubyte", train_y)
    _idx(raw / "t10k-images-idx3-ubyte", test_x)
    _idx(raw / "t10k-labels-idx1-ubyte", test_y)
    d = load_data(name, root=str(tmp_path))
    assert (len(d.train), len(d.test), d.in_channels, d.image_size) == (12, 5, 1, 28)
    x, y = d.test[3]
    assert y == 3 and x.shape == (1, 28, 28)
    # pixel values are the file's bytes, normalised
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    assert torch.allclose(x[0] * std + mean, torch.tensor(test_x[3] / 255.0, dtype=torch.float32), atol=1e-5)
    assert len(load_data(name, root=str(tmp_path), limit_train=4).train) == 4


def test_missing_files_say_where_they_are_expected(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/MNIST/raw.*train-images-idx3-ubyte.*--download"):
        load_data("mnist", root=str(tmp_path))
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1"):
        load_data("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="train/<class>"):
        load_data("imagefolder", root=str(tmp_path))


def _cifar(tmp_path, n=4):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {"batch_label": name, "labels": [(i + j) % 10 for j in range(n)],
                 "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "filenames": [f"{j}.png" for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def test_cifar10_reads_real_python_batches(tmp_path):
    folder = _cifar(tmp_path)
    d = load_data("cifar10", root=str(tmp_path))
    assert (len(d.train), len(d.test), d.class_names[2]) == (20, 4, "bird")
    x, y = d.test[1]
    raw = pickle.loads((folder / "test_batch").read_bytes())
    expected = torch.tensor(raw["data"][1].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
    mean = torch.tensor((0.4914, 0.4822, 0.4465))[:, None, None]
    std = torch.tensor((0.2470, 0.2435, 0.2616))[:, None, None]
    assert y == raw["labels"][1] and torch.allclose(x * std + mean, expected, atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('pwned', 'w').write('x')",))


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path, monkeypatch):
    folder = _cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Evil(), "labels": [0]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="test_batch.*refusing to load builtins.exec"):
        load_data("cifar10", root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_imagefolder_reads_images(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 12), colour).save(tmp_path / split / cls / f"{i}.png")
    d = load_data("imagefolder", root=str(tmp_path), image_size=8)
    assert d.class_names == ["blue", "red"] and len(d.train) == 6
    x, y = d.train[0]
    assert x.shape == (3, 8, 8) and y == 0 and torch.allclose(x[2], torch.ones(8, 8))


def test_download_without_network_says_where_the_files_go(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvu, "download_url", offline)
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    import torchvision.datasets.mnist as tvm
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvm, "download_and_extract_archive", offline)
    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=f"MNIST: download failed .*put the files train-images-idx3-ubyte.* in "
                                        f"{tmp_path}/MNIST/raw"):
        load_data("mnist", root=str(tmp_path), download=True)
    with pytest.raises(DataError, match=f"CIFAR-10: download failed .*data_batch_1.* in {tmp_path}/cifar-10-batches-py"):
        load_data("cifar10", root=str(tmp_path), download=True)
