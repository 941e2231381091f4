"""The run directory: atomic writes, results.json, config.toml, figures, and re-rendering."""

from __future__ import annotations

import os
import re
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .errors import OutputError, ResinspectError

__all__ = ["write_atomic", "new_run_dir", "render_run", "read_config_file", "dump_toml", "output_error"]

_RUN_MARKERS = ("results.json", "index.html")


def output_error(path: str | os.PathLike, action: str, e: OSError) -> OutputError:
    """One line for an operating-system error at the output edge: the path, what failed and why."""
    reason = e.strerror or str(e)
    return OutputError(f"output {path}: cannot {action}: {reason}")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``: readers never see half a file.

    An operating-system error (no permission, disk full, …) becomes :class:`OutputError` naming the path;
    the previous file, if any, is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        raise output_error(path, "write", e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def new_run_dir(out: str | os.PathLike | None, root: str | os.PathLike, label: str, overwrite: bool = False) -> Path:
    """``out`` if given (refusing to mix with an existing run unless ``overwrite``), else a new
    ``root/<timestamp>-<label>`` folder."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ResinspectError(f"output {path}: exists and is not a directory")
        if path.exists() and any((path / m).exists() for m in _RUN_MARKERS):
            if not overwrite:
                raise ResinspectError(f"output {path}: already holds a run (results.json or index.html); "
                                      "choose another --out or pass --overwrite")
            for marker in _RUN_MARKERS:  # an old report must never pass for the new run's
                (path / marker).unlink(missing_ok=True)
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
