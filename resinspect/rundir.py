"""The run directory: atomic writes, results.json, config.toml, figures, and re-rendering."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from .atomic import output_error, write_atomic
from .errors import ResinspectError

__all__ = [
    "write_atomic",
    "new_run_dir",
    "render_run",
    "read_config_file",
    "dump_toml",
    "output_error",
    "folder_kind",
    "relative_link",
]

_RUN_MARKERS = ("results.json", "index.html")
_SWEEP_MARKER = "sweep.json"


def folder_kind(path: str | os.PathLike) -> str:
    """What a folder holds, by the files resinspect writes: ``"sweep"`` (sweep.json), ``"run"``
    (results.json), ``"empty"`` (missing or empty), or ``"other"``. ``--overwrite`` replaces a folder of the
    same kind only: a run never replaces a sweep, nor a sweep a run."""
    path = Path(path)
    if not path.is_dir():
        return "empty"
    if (path / _SWEEP_MARKER).exists():
        return "sweep"
    if (path / "results.json").exists():
        return "run"
    return "other" if any(path.iterdir()) else "empty"


def relative_link(root: str | os.PathLike, target: str) -> str | None:
    """``target`` as a link a report in ``root`` may write: a relative path to an existing file inside
    ``root`` (no scheme, no absolute path, no ``..`` out of the folder), with ``/`` separators; None otherwise.
    Every link a report writes to another file goes through here."""
    if not isinstance(target, str) or not target or "\\" in target or ":" in target or target.startswith(("/", "#")):
        return None
    root_path = Path(root).resolve()
    resolved = (root_path / target).resolve()
    if root_path not in resolved.parents or not resolved.is_file():
        return None
    return resolved.relative_to(root_path).as_posix()


def new_run_dir(out: str | os.PathLike | None, root: str | os.PathLike, label: str, overwrite: bool = False) -> Path:
    """``out`` if given (refusing to mix with an existing run unless ``overwrite``), else a new
    ``root/<timestamp>-<label>`` folder."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ResinspectError(f"output {path}: exists and is not a directory")
        if folder_kind(path) == "sweep":
            raise ResinspectError(
                f"output {path}: is a sweep folder (it holds {_SWEEP_MARKER}); a run never replaces a "
                "sweep: choose another --out"
            )
        if path.exists() and any((path / m).exists() for m in _RUN_MARKERS):
            if not overwrite:
                raise ResinspectError(
                    f"output {path}: already holds a run (results.json or index.html); "
                    "choose another --out or pass --overwrite"
                )
            for marker in _RUN_MARKERS:  # an old report must never pass for the new run's
                (path / marker).unlink(missing_ok=True)
            _remove_tree(path / "tb")  # nor old event files mix into the new run's TensorBoard charts
        _mkdir(path, exist_ok=True)
        return path
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    _mkdir(path, exist_ok=False)
    return path


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise output_error(path, "remove the old run's TensorBoard logs", e) from e


def _mkdir(path: Path, exist_ok: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
        probe = path / f".resinspect-write-test-{os.getpid()}"
        probe.write_bytes(b"")  # a folder that exists but is read-only fails here, before any work
        probe.unlink()
    except OSError as e:
        raise output_error(path, "create the run directory" if not path.is_dir() else "write into it", e) from e


def render_run(run_dir: str | os.PathLike) -> Path:
    """Re-render ``run_dir/index.html`` from results.json and the stored figures; nothing is recomputed."""
    from .report import render_html
    from .results import Results

    run_dir = Path(run_dir)
    results = Results.read(run_dir)
    config = run_dir / "config.toml"
    config_text = config.read_text(encoding="utf-8") if config.is_file() else ""
    write_atomic(run_dir / "index.html", render_html(results, config_text))
    return run_dir / "index.html"


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResinspectError(f"config {path}: no such file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ResinspectError(f"config {path}: not valid TOML: {e}") from e


def dump_toml(data: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return tomli_w.dumps(clean(data))
