"""Pretrained weights for the model you already have.

``--weights`` is either a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2`` …) of a
``torchvision:<builder>`` model, resolved with torchvision's weights API and read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``, so it works offline once cached; with no cached file one line names
the expected path and the URL to fetch, and ``--download`` lets torchvision fetch it), or a state-dict file in
the formats users have:

- ``.pth`` / ``.pt`` / ``.bin``: a torch pickle of a state dict (also one wrapped as ``{"state_dict": …}``,
  ``{"model": …}`` or ``{"model_state_dict": …}``, or saved from ``DistributedDataParallel`` with
  ``module.`` prefixes), loaded with ``weights_only=True``;
- ``.safetensors``: read by :func:`read_safetensors`, a reader of that format written here (an 8-byte
  header length, a JSON header, raw little-endian tensors), so no optional package is needed.

Keys are matched strictly: a file that does not fit the model is refused with the missing, unexpected and
wrongly shaped keys listed. Nothing in a weights file is ever executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ResinspectError

__all__ = [
    "Pretrained",
    "resolve_weights",
    "read_state_dict",
    "read_safetensors",
    "load_strict",
    "torchvision_builders",
    "imagenet_wnids",
    "cached_weights_path",
    "class_mapping",
    "pretrained_bundle",
    "fit_to_model",
]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class Pretrained:
    """Resolved ``--weights``: the state dict, where it came from, and what the weights know about their
    data (class names, the inference transform) when they come from torchvision's weights API or the
    architecture's default torchvision weights."""

    source: str
    state_dict: dict[str, torch.Tensor]
    num_classes: int | None
    categories: list[str] | None = None
    transform: Any = None
    notes: list[str] = field(default_factory=list)
    image_size: int | None = None  # the transform's output size, where it has no ``crop_size`` (timm's)


def torchvision_builders() -> list[str]:
    """Every classification builder of torchvision (``torchvision.models.list_models``)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted, as ImageNet's folders are), shipped
    with resinspect: ``imagenet_wnids()[0] == "n01440764"`` (tench)."""
    path = Path(__file__).resolve().parents[1] / "data" / "imagenet_wnids.txt"
    return path.read_text().split()


def _weights_enum(arch: str) -> Any:
    import torchvision.models as tvm

    return tvm.get_model_weights(arch)


def cached_weights_path(weights: Any) -> Path:
    """Where torch hub keeps the file of torchvision ``weights`` (``$TORCH_HOME/hub/checkpoints/…``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _is_file_argument(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_FILE_SUFFIXES) or Path(value).exists()


def resolve_weights(model: str, value: str, download: bool = False) -> Pretrained:
    """``--weights value`` for model ``model``: a torchvision weights name or a state-dict file."""
    if _is_file_argument(value):
        return _from_file(model, Path(value))
    if not model.startswith("torchvision:"):
        raise ResinspectError(
            f"--weights {value}: weights names are torchvision's, for torchvision:<builder> models; for "
            f"{model} give a state-dict file (.pth, .pt, .bin, .safetensors)"
            + (" (timm's own download is not used: resinspect runs offline)" if model.startswith("timm:") else "")
        )
    arch = model.partition(":")[2]
    enum = _weights_enum(arch)
    valid = [n for n in enum.__members__]
    if value not in valid:
        raise ResinspectError(
            f"--weights {value}: not a weights name of torchvision's {arch}; valid: {', '.join(valid)}"
        )
    weights = enum[value]
    path = cached_weights_path(weights)
    if not path.is_file():
        if not download:
            raise ResinspectError(
                f"--weights {value} ({weights}): not in the torch hub cache; expected {path}. Fetch "
                f"{weights.url} to that path (or pass --download where there is network)"
            )
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a bad hash: one line, no traceback
            raise ResinspectError(f"--weights {value}: could not download {weights.url}: {e}") from None
    sd = _fix_torchvision_keys(arch, read_state_dict(path))
    return Pretrained(
        source=f"torchvision {weights} ({path})",
        state_dict=sd,
        num_classes=len(weights.meta.get("categories") or []) or None,
        categories=list(weights.meta.get("categories") or []) or None,
        transform=weights.transforms(),
    )


def _from_file(model: str, path: Path) -> Pretrained:
    sd = read_state_dict(path)
    pre = Pretrained(source=str(path), state_dict=sd, num_classes=None)  # set by fit_to_model
    if model.startswith("torchvision:"):
        arch = model.partition(":")[2]
        pre.state_dict = _fix_torchvision_keys(arch, sd)
        try:
            default = _weights_enum(arch).DEFAULT
        except (ValueError, AttributeError, KeyError):
            default = None
        if default is not None:
            pre.transform = default.transforms()
            pre.notes.append(f"preprocessing: the transform of {arch}'s default torchvision weights ({default})")
            pre.categories = list(default.meta.get("categories") or []) or None  # kept if the head fits them
    elif model.startswith("timm:"):
        _timm_preprocessing(pre, model.partition(":")[2])
    return pre


def _timm_preprocessing(pre: Pretrained, arch: str) -> None:
    """The inference transform timm's ``arch`` was trained with (from its pretrained config, which ships
    with timm: nothing is downloaded), and ImageNet's class names for a 1000-class head."""
    from .registry import require_timm

    timm = require_timm()
    from timm.data import create_transform, resolve_data_config

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        pre.notes.append(f"preprocessing: timm has no pretrained config for {arch}; the dataset's own is kept")
        return
    data_cfg = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    pre.transform = create_transform(**data_cfg)
    pre.image_size = int(data_cfg["input_size"][-1])
    pre.notes.append(f"preprocessing: timm's inference transform for {arch} ({data_cfg})")
    if int(getattr(cfg, "num_classes", 0) or 0) == 1000:
        import torchvision.models as tvm

        pre.categories = list(tvm.ResNet50_Weights.DEFAULT.meta["categories"])  # ImageNet-1k, index order


def _fix_torchvision_keys(arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet weights use old key names (``norm.1``) that its builder renames on load; do
    the same (the only torchvision family whose published keys differ from its modules')."""
    if not arch.startswith("densenet"):
        return sd
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for k, v in sd.items():
        m = pattern.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def fit_to_model(pre: Pretrained, model: nn.Module) -> tuple[int | None, int | None]:
    """The input channels and class count the weights were made for, read from the tensors of ``model``'s
    first convolution and last ``nn.Linear`` (the model built for the dataset, only to find their names; the
    file's key order is not relied on: safetensors files sort their keys). Sets ``pre.num_classes`` (and drops
    class names that do not fit it)."""
    first = next((n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    w_in = pre.state_dict.get(f"{first}.weight") if first is not None else None
    w_out = pre.state_dict.get(f"{last}.weight") if last is not None else None
    channels = int(w_in.shape[1]) if w_in is not None and w_in.dim() == 4 else None
    if w_out is not None and w_out.dim() == 2:
        pre.num_classes = int(w_out.shape[0])
    if pre.categories and pre.num_classes != len(pre.categories):
        pre.categories = None
    return channels, pre.num_classes


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``.safetensors`` or a torch pickle), unwrapped; every failure one line
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights {path}: no such file")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(
                f"weights {path}: not a readable state dict ({first[:200]}); it may be truncated, or hold "
                "objects other than tensors (only tensors are loaded, with weights_only=True)"
            ) from None
        sd = _unwrap(obj, path)
    return sd


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == "resinspect-checkpoint":
        raise CheckpointError(f"weights {path}: a resinspect checkpoint; load it with --checkpoint instead")
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict whose values are not all tensors"
        raise CheckpointError(f"weights {path}: expected a state dict (parameter name -> tensor), found {kind}")
    if all(str(k).startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (the format of Hugging Face's ``safetensors``: a little-endian
    u64 header length, a JSON header mapping names to ``dtype``, ``shape`` and ``data_offsets`` into the
    byte buffer that follows). Checks every offset and size against the file before reading."""
    path = Path(path)
    data = path.read_bytes()

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"weights {path}: not a valid .safetensors file ({problem})")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise bad(f"its header claims {n:,} bytes but the file has {len(data) - 8:,} after the length; truncated?")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    buffer = memoryview(data)[8 + n :]
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            dtypes = ", ".join(_SAFETENSORS_DTYPES)
            raise bad(f"tensor '{name}': needs dtype (one of {dtypes}), shape and data_offsets") from None
        count = 1
        for s in shape:
            count *= s
        size = count * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buffer) or end - begin != size:
            raise bad(
                f"tensor '{name}': bytes {begin}..{end} do not hold a {info['dtype']} tensor of shape {shape} "
                f"in a buffer of {len(buffer):,} bytes; truncated?"
            )
        raw = bytearray(buffer[begin:end])
        out[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)
    return out


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(sd)`` with every key and shape checked first: a mismatch is one message
    listing the missing, unexpected and wrongly shaped keys (five of each, and how many)."""
    from .checkpoint import state_dict_mismatch

    problems = state_dict_mismatch(
        model, sd, 5, ("missing", "unexpected", "wrong shape"), versus="vs the model's", more=" and {} more"
    )
    if problems:
        raise CheckpointError(f"weights {source} do not fit {type(model).__name__}: " + problems)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


class _Relabelled(torch.utils.data.Dataset):
    """``(x, y)`` of ``base`` with ``y`` replaced by ``mapping[y]``: a dataset's classes as the model's."""

    def __init__(self, base: Any, mapping: list[int]):
        self.base, self.mapping = base, mapping

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.base[i]
        return x, self.mapping[int(y)]


def _set_transform(dataset: Any, transform: Any) -> bool:
    """Give an ImageFolder (also inside a ``Subset``) ``transform``; False when the dataset is not one."""
    from torchvision.datasets import DatasetFolder

    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, DatasetFolder):
        dataset.transform = transform
        return True
    return False


def class_mapping(names: list[str], pre: Pretrained) -> tuple[list[int], str]:
    """How the dataset's classes (folder names) become the model's class indices, and a sentence saying so:
    ImageNet ids (``n01440764``) by the ImageNet-1k index, else the weights' own class names, else the
    dataset's label order itself."""
    k = pre.num_classes or len(names)
    if k == 1000:
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        if names and all(n in index for n in names):
            return [
                index[n] for n in names
            ], f"the {len(names)} folder names are ImageNet ids, mapped onto the 1000 classes"
    if pre.categories:
        index = {c.lower(): i for i, c in enumerate(pre.categories)}
        if names and all(n.lower() in index for n in names):
            return [index[n.lower()] for n in names], f"the {len(names)} folder names are the weights' class names"
    if len(names) == k:
        return list(range(k)), f"the dataset's {k} classes are the model's {k}, in label order"
    if len(names) > k:
        raise ResinspectError(
            f"the dataset has {len(names)} classes and the weights' head {k}: its classes cannot be the model's "
            "(its class names are neither ImageNet ids nor the weights' class names)"
        )
    return list(range(len(names))), (
        f"the {len(names)} class names are neither ImageNet ids nor the weights' class names: label i is taken as "
        f"the model's class i of {k} (the accuracy means something only if they correspond)"
    )


def pretrained_bundle(bundle: Any, pre: Pretrained, expected: int | None = None) -> Any:
    """``bundle`` as the pretrained model sees it: the weights' inference transform on image folders, the
    dataset's classes mapped onto the model's (:func:`class_mapping`), the model's class count and names;
    ``info`` says what was done. ``expected``: the weights' input channels (:func:`fit_to_model`)."""
    import dataclasses

    if expected is not None and expected != bundle.in_channels:
        raise ResinspectError(
            f"--weights {pre.source}: the weights take {expected}-channel images; dataset {bundle.name} has "
            f"{bundle.in_channels}"
        )
    info = dict(bundle.info, weights=pre.source)
    image_size = bundle.image_size
    if pre.transform is not None:
        if _set_transform(bundle.train, pre.transform) | _set_transform(bundle.test, pre.transform):
            crop = getattr(pre.transform, "crop_size", None)
            image_size = int(crop[0]) if crop else pre.image_size or image_size
            info["preprocessing"] = " ".join(repr(pre.transform).split())
        else:
            info["preprocessing"] = (
                f"the dataset's own ({bundle.name}): the weights' transform applies to image folders"
            )
    mapping, said = class_mapping(list(bundle.class_names), pre)
    info["classes"] = said
    if pre.notes:
        info["weights_notes"] = list(pre.notes)
    k = pre.num_classes or bundle.num_classes
    names = pre.categories if pre.categories and len(pre.categories) == k else [f"class {i}" for i in range(k)]
    if mapping == list(range(len(mapping))) and not pre.categories:
        names = list(bundle.class_names) + names[len(bundle.class_names) :]
    return dataclasses.replace(
        bundle,
        train=_Relabelled(bundle.train, mapping),
        test=_Relabelled(bundle.test, mapping),
        num_classes=k,
        class_names=names,
        image_size=image_size,
        info=info,
    )
