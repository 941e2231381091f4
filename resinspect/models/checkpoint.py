"""Checkpoints that carry what is needed to rebuild the model, loaded with ``weights_only=True``.

A checkpoint is a dict: ``format``, ``version``, ``arch`` (model name),
``arch_kwargs`` (in_channels, num_classes, image_size), ``dataset``,
``metrics`` and ``state_dict``. Every failure names the file and the problem.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .registry import _is_factory_path, build_model

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "resinspect-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED = ("format", "version", "arch", "arch_kwargs", "state_dict")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any],
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (a temporary file renamed into place)."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "dataset": dict(dataset or {}),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's contents without building a model."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, not a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        if not lines:
            raise CheckpointError(
                f"checkpoint {path}: unreadable, the file is truncated or is not a PyTorch file (not a valid pickle)"
            ) from e
        detail = f": {lines[0]}"
        raise CheckpointError(
            f"checkpoint {path}: refused to load: it holds objects other than tensors and plain data "
            f"(loaded with weights_only=True){detail}"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"checkpoint {path}: unreadable, the file is truncated or is not a PyTorch file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        looks = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            looks = "; it looks like a bare state dict (save it with resinspect to record the architecture)"
        raise CheckpointError(f"checkpoint {path}: not a resinspect checkpoint{looks}")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: incomplete, missing {', '.join(missing)}")
    problem = _field_problem(payload)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    if payload["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {payload['version']} is newer than this resinspect "
            f"understands ({CHECKPOINT_VERSION}); upgrade resinspect"
        )
    return payload


# the checkpoint's schema: each field, what it must hold, and the check
_FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("format", "a string", lambda v: isinstance(v, str)),
    ("version", "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    ("arch", "a model name (a string)", lambda v: isinstance(v, str) and bool(v)),
    (
        "arch_kwargs",
        "a table of the model's arguments (str -> value)",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    ),
    ("dataset", "a table describing the dataset", lambda v: isinstance(v, dict)),
    (
        "metrics",
        "a table of numbers",
        lambda v: (
            isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
        ),
    ),
    (
        "state_dict",
        "a table of tensors (parameter name -> tensor)",
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
    ),
)


def _field_problem(payload: dict[str, Any]) -> str | None:
    """The first field of a checkpoint that does not hold what it must, in words (None: all good)."""
    for name, expected, ok in _FIELDS:
        if name in payload and not ok(payload[name]):
            got = type(payload[name]).__name__
            return f"field '{name}' should be {expected}, but holds a {got}"
    return None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, allow_factory: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint into ``model`` (or into a model rebuilt from its ``arch``).

    A checkpoint whose architecture is a user factory (``pkg.mod:fn``) is only
    rebuilt when the caller names that same factory in ``allow_factory``:
    a data file never decides which code gets imported.

    Returns ``(model, payload)``.
    """
    payload = read_checkpoint(path)
    arch, kwargs = payload["arch"], payload["arch_kwargs"]
    if model is None:
        if _is_factory_path(arch) and arch != allow_factory:
            raise CheckpointError(
                f"checkpoint {path}: architecture '{arch}' is a user factory; name it explicitly "
                f"(--model {arch}) to allow importing that code"
            )
        try:
            model = build_model(arch, **kwargs)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: cannot rebuild architecture '{arch}': {e}") from e
    result = _load_state(model, payload["state_dict"])
    if result:
        raise CheckpointError(f"checkpoint {path}: does not match the model (checkpoint arch '{arch}'): {result}")
    return model, payload


def state_dict_mismatch(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    shown: int = 3,
    labels: tuple[str, str, str] = ("missing keys", "unexpected keys", "shape mismatch"),
    versus: str = "vs",
    more: str = " (+{} more)",
) -> str:
    """What keeps ``state`` from loading into ``model`` strictly, in one line ("" when nothing): the missing,
    unexpected and wrongly shaped keys, ``shown`` of each (``labels`` name the three kinds, ``versus`` sits
    between the file's shape and the model's, ``more`` says how many were not shown)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} {versus} {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    for label, items in zip(labels, (missing, unexpected, shapes)):
        if items:
            rest = more.format(len(items) - shown) if len(items) > shown else ""
            problems.append(f"{label}: {', '.join(items[:shown])}{rest}")
    return "; ".join(problems)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    problems = state_dict_mismatch(model, state)
    if problems:
        return problems
    model.load_state_dict(state)
    return ""
