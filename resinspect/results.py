"""results.json as one typed model: built by the runner, written once, read back by ``report`` (and by
anything that compares runs), validated against the documented schema in one place.

    results = Results.read("reports/my-run")      # ResinspectError for a missing, foreign or other-version file
    results.plugins["ablation"].sections[0].metrics
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import ResinspectError
from .section import Section

__all__ = [
    "Results",
    "network_values",
    "model_depth",
    "RunInfo",
    "PluginResult",
    "SCHEMA_VERSION",
    "RESULTS_FILE",
    "STATUSES",
    "results_json",
    "schema",
    "validate",
]

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
SCHEMA_NAME = "resinspect.results"
# running: written at the start; interrupted: Ctrl-C or a kill the process saw (run.phase says where)
STATUSES = ("running", "interrupted", "complete", "plugins_failed", "failed")
_SCHEMA_FILE = Path(__file__).with_name("results-schema.json")


@dataclass
class RunInfo:
    name: str
    dir: str
    started: str
    finished: str | None = None
    seconds: float | None = None
    phase: str | None = None  # the stage the run was in when it stopped (interrupted/failed runs)
    peak_rss_mb: float | None = None  # the process's peak resident memory over the whole run (rank 0)


@dataclass
class PluginResult:
    """One plugin's outcome: ``status`` ``ok``, ``skipped`` (every section said the analysis does not apply) or
    ``failed`` (with the hook, error and traceback)."""

    status: str = "ok"
    version: str = ""
    description: str = ""
    seconds: float = 0.0
    error: str | None = None
    failed_hook: str | None = None
    traceback: str | None = None
    sections: list[Section] = field(default_factory=list)
    peak: dict[str, float] = field(default_factory=dict)  # peak memory of its analysis: rss_mb, cuda_mb
    estimate_seconds: float | None = None  # what the run estimated before the analysis phase


@dataclass
class Results:
    """Everything results.json holds (see docs/results.md for each key)."""

    run: RunInfo
    config: dict[str, Any]
    environment: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    status: str = "running"
    error: str | None = None
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugins: dict[str, PluginResult] = field(default_factory=dict)
    core_sections: list[Section] = field(default_factory=list)
    tensorboard: dict[str, Any] = field(default_factory=dict)
    resinspect_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # -- views ---------------------------------------------------------------------------------
    def sections(self) -> list[Section]:
        """Core sections first, then each plugin's, in run order."""
        return list(self.core_sections) + [s for p in self.plugins.values() for s in p.sections]

    def metrics(self) -> dict[str, Any]:
        """Every section metric, flat: ``"<plugin>/<metric>"`` (the training section under ``train``, the per-block
        dossier under ``dossier``)."""
        out: dict[str, Any] = {}
        core = [("train" if s.plugin in ("core", "") else s.plugin, [s]) for s in self.core_sections]
        for name, secs in core + [(n, p.sections) for n, p in self.plugins.items()]:
            for s in secs:
                for k, v in s.metrics.items():
                    out.setdefault(f"{name}/{k}", v)
        return out

    # -- writing -------------------------------------------------------------------------------
    def to_dict(self, figure_files: dict[int, list[str]] | None = None) -> dict[str, Any]:
        files = figure_files or {}

        def secs(items: list[Section]) -> list[dict[str, Any]]:
            return [s.to_dict(files.get(id(s), [])) for s in items]

        return {
            "schema": SCHEMA_NAME,
            "schema_version": self.schema_version,
            "resinspect_version": self.resinspect_version,
            "status": self.status,
            "error": self.error,
            "run": {k: v for k, v in vars(self.run).items() if v is not None or k in ("name", "dir", "started")},
            "config": self.config,
            "environment": self.environment,
            "model": self.model,
            "data": self.data,
            "training": self.training,
            "plugins": {
                n: {
                    "status": p.status,
                    "version": p.version,
                    "description": p.description,
                    "seconds": round(p.seconds, 4),
                    "error": p.error,
                    "failed_hook": p.failed_hook,
                    "traceback": p.traceback,
                    "sections": secs(p.sections),
                    **({"peak": p.peak} if p.peak else {}),
                    **({"estimate_seconds": round(p.estimate_seconds, 2)} if p.estimate_seconds is not None else {}),
                }
                for n, p in self.plugins.items()
            },
            "core_sections": secs(self.core_sections),
            **({"tensorboard": self.tensorboard} if self.tensorboard else {}),
        }

    def write(self, run_dir: Path, figures: bool = True) -> None:
        """Write the figures (PNG files under ``figures/``) and then results.json, both atomically."""
        files: dict[int, list[str]] = {}
        if figures:
            for owner, secs in [("core", self.core_sections)] + [(n, p.sections) for n, p in self.plugins.items()]:
                for si, s in enumerate(secs):
                    files[id(s)] = []
                    for fi, fig in enumerate(s.figures):
                        rel = f"figures/{re.sub(r'[^A-Za-z0-9_-]+', '-', owner)}-{si}-{fi}.png"
                        write_atomic(run_dir / rel, fig.png)
                        files[id(s)].append(rel)
        write_atomic(run_dir / RESULTS_FILE, results_json(self.to_dict(files)))

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], run_dir: Path | None = None, where: str = RESULTS_FILE) -> Results:
        """Parse a results.json dict, checking its schema; figures are loaded from ``run_dir`` when given."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA_NAME:
            raise ResinspectError(f"{where}: not a resinspect results file")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResinspectError(
                f"{where}: schema version {version}, but this resinspect ({_version()}) reads "
                f"version {SCHEMA_VERSION} only"
            )
        problems = validate(d)
        if problems:
            from .schema import describe_problem

            raise ResinspectError(f"{where}: does not match the results schema: {describe_problem(problems)}")
        load = _png_loader(run_dir, where) if run_dir is not None else (lambda rel: b"")
        plugins = {}
        for name, p in d["plugins"].items():
            plugins[name] = PluginResult(
                status=p["status"],
                version=p["version"],
                description=p["description"],
                seconds=p["seconds"],
                error=p["error"],
                failed_hook=p.get("failed_hook"),
                traceback=p["traceback"],
                sections=[Section.from_dict(s, load) for s in p.get("sections", [])],
                peak=dict(p.get("peak") or {}),
                estimate_seconds=p.get("estimate_seconds"),
            )
        known = {f.name for f in fields(RunInfo)}
        return cls(
            run=RunInfo(**{k: v for k, v in d["run"].items() if k in known}),
            config=d["config"],
            environment=d["environment"],
            model=d["model"],
            data=d["data"],
            status=d["status"],
            error=d["error"],
            training=d["training"],
            plugins=plugins,
            core_sections=[Section.from_dict(s, load) for s in d["core_sections"]],
            tensorboard=d.get("tensorboard") or {},
            resinspect_version=d["resinspect_version"],
            schema_version=version,
        )

    @classmethod
    def read(cls, run_dir: str | Path) -> Results:
        """Read ``run_dir/results.json`` (and its figures)."""
        run_dir = Path(run_dir)
        path = run_dir / RESULTS_FILE
        if not path.is_file():
            raise ResinspectError(f"{path}: no such file; is {run_dir} a resinspect run directory?")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResinspectError(f"{path}: not valid JSON ({e})") from e
        except OSError as e:
            raise ResinspectError(f"{path}: cannot read: {e.strerror or e}") from e
        return cls.from_dict(d, run_dir, str(path))


def _version() -> str:
    from . import __version__

    return __version__


def _png_loader(run_dir: Path, where: str):
    def load_png(rel: str) -> bytes:
        target = (run_dir / rel).resolve()
        if run_dir.resolve() not in target.parents:
            raise ResinspectError(f"{where}: figure path {rel!r} points outside the run directory")
        if not target.is_file():
            raise ResinspectError(f"{run_dir}: figure {rel} listed in results.json is missing")
        return target.read_bytes()

    return load_png


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


def schema() -> dict[str, Any]:
    """The JSON Schema of results.json (also in docs/results-schema.json)."""
    return json.loads(_SCHEMA_FILE.read_text(encoding="utf-8"))


def validate(d: dict[str, Any]) -> list[str]:
    """Problems of ``d`` against the schema (``"field/path: expected ..., got ..."``; empty when valid), by
    :mod:`resinspect.schema`, which needs no extra package."""
    from .schema import load_schema
    from .schema import validate as validate_against

    return validate_against(d, load_schema(_SCHEMA_FILE.name))


def model_depth(name: str) -> int | None:
    """The depth a model's name ends in (``resnet56`` → 56, ``plain20`` → 20), or None."""
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def network_values(r: Results) -> dict[str, dict[str, float]]:
    """Per network of a run (``model``, and ``twin`` when trained), its numbers by name: ``test_error`` and
    ``train_error`` (1 - final accuracy), ``test_error_curve/<epoch>`` and ``train_error_curve/<epoch>``, and
    every numeric plugin metric ``<plugin>/<name>`` with the network's ``model/``/``twin/`` prefix taken off
    (metrics without such a prefix belong to the model)."""
    out: dict[str, dict[str, float]] = {}
    for role, h in r.training.items():
        epochs = h.get("epochs") or []
        v = out.setdefault(role, {})
        if epochs:
            v["test_error"] = 1 - epochs[-1]["test_accuracy"]
            v["train_error"] = 1 - epochs[-1]["train_accuracy"]
            for e in epochs:
                v[f"test_error_curve/{e['epoch']}"] = 1 - e["test_accuracy"]
                v[f"train_error_curve/{e['epoch']}"] = 1 - e["train_accuracy"]
    for plugin, p in r.plugins.items():
        for s in p.sections:
            for k, raw in s.metrics.items():
                x = _number(raw)
                if x is None:
                    continue
                head, _, rest = k.partition("/")
                if head in ("model", "twin") and rest:
                    role, name = head, rest
                else:
                    role, name = (s.role or "model"), k
                out.setdefault(role, {}).setdefault(f"{plugin}/{name}", x)
    return out
