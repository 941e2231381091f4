"""The run directory: atomic writes, results.json, config.toml, figures, and re-rendering."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ResinspectError
from .section import Section

__all__ = ["write_atomic", "new_run_dir", "save_results", "load_results", "render_run", "SCHEMA_VERSION",
           "RESULTS_FILE", "read_config_file"]

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
_RUN_MARKERS = ("results.json", "index.html")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
        path.mkdir(parents=True, exist_ok=True)
        return path
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def save_results(run_dir: Path, results: dict[str, Any], sections: dict[str, list[Section]],
                 core_sections: list[Section]) -> None:
    """Write figures, then results.json (sections serialised with their figure files)."""
    def dump(owner: str, secs: list[Section]) -> list[dict[str, Any]]:
        out = []
        for si, s in enumerate(secs):
            files = []
            for fi, fig in enumerate(s.figures):
                rel = f"figures/{re.sub(r'[^A-Za-z0-9_-]+', '-', owner)}-{si}-{fi}.png"
                write_atomic(run_dir / rel, fig.png)
                files.append(rel)
            out.append(s.to_dict(files))
        return out

    results["core_sections"] = dump("core", core_sections)
    for name, secs in sections.items():
        results["plugins"].setdefault(name, {})["sections"] = dump(name, secs)
    write_atomic(run_dir / RESULTS_FILE, results_json(results))


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: "nan", "inf", "-inf"
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def results_json(results: dict[str, Any]) -> str:
    """Strict JSON (non-finite floats become strings), for results.json."""
    return json.dumps(_finite(results), indent=2, allow_nan=False, default=str)


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise ResinspectError(f"{path}: no such file; is {run_dir} a resinspect run directory?")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResinspectError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(results, dict) or results.get("schema") != "resinspect.results":
        raise ResinspectError(f"{path}: not a resinspect results file")
    if results.get("schema_version", 0) > SCHEMA_VERSION:
        raise ResinspectError(f"{path}: schema version {results['schema_version']} is newer than this resinspect "
                              f"understands ({SCHEMA_VERSION})")
    return results


def sections_from_results(run_dir: Path, results: dict[str, Any]) -> list[Section]:
    def load_png(rel: str) -> bytes:
        target = (run_dir / rel).resolve()
        if run_dir.resolve() not in target.parents:
            raise ResinspectError(f"{run_dir / RESULTS_FILE}: figure path {rel!r} points outside the run directory")
        if not target.is_file():
            raise ResinspectError(f"{run_dir}: figure {rel} listed in results.json is missing")
        return target.read_bytes()

    sections = [Section.from_dict(d, load_png) for d in results.get("core_sections", [])]
    for plugin in results.get("plugins", {}).values():
        sections += [Section.from_dict(d, load_png) for d in plugin.get("sections", [])]
    return sections


def render_run(run_dir: str | os.PathLike) -> Path:
    """Re-render ``run_dir/index.html`` from results.json and the stored figures; nothing is recomputed."""
    from .report import render_html

    run_dir = Path(run_dir)
    results = load_results(run_dir)
    config = run_dir / "config.toml"
    config_text = config.read_text(encoding="utf-8") if config.is_file() else ""
    html = render_html(results, sections_from_results(run_dir, results), config_text)
    write_atomic(run_dir / "index.html", html)
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
