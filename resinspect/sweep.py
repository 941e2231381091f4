"""Experiments across depths and seeds: ``resinspect sweep`` and :func:`sweep`.

A sweep trains and analyses every (model, seed) combination into one folder: an ordinary run directory per
combination (``<model>-seed<k>/``), ``sweep.json`` (the grid, each run's status and path, the aggregated
metrics) and ``index.html``, the sweep report (test error against depth for residual and plain networks, the
training curves per depth, every plugin's key metrics against depth, and whether the plain family degrades).

Rerunning the same sweep skips the combinations whose run is complete and redoes the others (an interrupted
or failed run is never counted). ``jobs > 1`` runs combinations in parallel processes, each with its share of
the CPU threads.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .errors import ResinspectError
from .results import Results, model_depth, network_values
from .rundir import dump_toml, folder_kind, output_error, write_atomic
from .settings import RunSettings

__all__ = ["sweep", "SweepResult", "aggregate", "read_sweep", "render_sweep", "SWEEP_FILE"]

SWEEP_FILE = "sweep.json"
SCHEMA = "resinspect.sweep"
SCHEMA_VERSION = 1
_DONE = ("complete", "plugins_failed")
# settings that vary inside a sweep or only say where things go: not part of a sweep's identity
_NOT_IDENTITY = ("model", "seed", "out", "reports_root")


@dataclass
class SweepRun:
    model: str
    seed: int
    path: str  # relative to the sweep folder
    status: str = "pending"
    seconds: float | None = None
    reused: bool = False
    error: str | None = None


@dataclass
class SweepResult:
    """What a sweep produced: its folder, the runs (model, seed, path, status), the aggregate
    (:func:`aggregate`), and ``exit_code`` 0 only when every run completed without a failed plugin."""

    sweep_dir: Path
    runs: list[SweepRun]
    aggregate: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if all(r.status == "complete" for r in self.runs) else 1


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def _parse_seeds(seeds: Iterable[Any]) -> list[int]:
    out = []
    for s in seeds:
        try:
            out.append(int(s))
        except (TypeError, ValueError):
            raise ResinspectError(f"--seeds: '{s}' is not an integer") from None
    if not out:
        raise ResinspectError("--seeds: give at least one seed")
    if len(set(out)) != len(out):
        raise ResinspectError(f"--seeds: a seed is listed twice ({', '.join(map(str, out))})")
    return out


def _check_models(models: Sequence[str]) -> list[str]:
    from .models.registry import model_factory

    models = [m.strip() for m in models if m.strip()]
    if not models:
        raise ResinspectError("--models: give at least one model")
    if len(set(models)) != len(models):
        raise ResinspectError(f"--models: a model is listed twice ({', '.join(models)})")
    for m in models:
        model_factory(m)  # an unknown name fails here, listing the valid ones
    return models


def _identity(s: RunSettings, pairs: Sequence[str]) -> dict[str, Any]:
    d = s.to_dict()
    for k in _NOT_IDENTITY:
        d.pop(k, None)
    return json.loads(
        json.dumps({"settings": d, "plugin_tables": s.plugin_tables, "options": sorted(pairs)}, default=str)
    )


def _with_defaults(old: Any, default: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(default, dict):
        return old
    out = dict(old)
    for k, v in default.items():
        out[k] = _with_defaults(old[k], v) if k in old else v
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} = {a!r} (now {b!r})"]


def _combo_settings(base: RunSettings, model: str, seed: int, out: Path) -> RunSettings:
    c = RunSettings(list(base.rows.values()), data_args=copy.deepcopy(base.data_args))
    c.values.update(copy.deepcopy(base.values))
    c.plugin_tables = copy.deepcopy(base.plugin_tables)
    c.update({"model": model, "seed": seed, "out": str(out)}, "sweep")
    return c


def _run_state(run_dir: Path) -> tuple[str, float | None]:
    """``complete``/``plugins_failed`` for a finished run directory, else what it says (or ``pending``), with
    the run's seconds."""
    if not (run_dir / "results.json").is_file():
        return "pending", None
    try:
        r = Results.read(run_dir)
    except ResinspectError:
        return "pending", None
    if r.status in _DONE and not (run_dir / "index.html").is_file():
        return "running", r.run.seconds
    return r.status, r.run.seconds


def sweep(
    models: Sequence[str],
    seeds: Sequence[int | str] = (0,),
    *,
    out: str | Path | None = None,
    jobs: int = 1,
    config: str | Path | None = None,
    settings: RunSettings | None = None,
    options: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    **values: Any,
) -> SweepResult:
    """Train and analyse every (model, seed) combination into one sweep folder and write its report.

    Args:
        models: model names (``resnet20``, ``plain20``, ``torchvision:resnet18``, …).
        seeds: random seeds; each model is run once per seed.
        out: the sweep folder (default ``<reports_root>/sweep-<models>``). Rerunning into the same folder
            resumes: complete runs are kept, the others redone.
        jobs: combinations run at once (``> 1``: in separate processes, torch threads divided among them).
        config, settings, options, values: as for :func:`resinspect.run` (every run setting applies to
            every combination; ``model``, ``seed`` and ``out`` are the sweep's).
        overwrite: discard the runs of a sweep folder made with other settings instead of refusing.
        echo: where progress lines go (default: nowhere).
    """
    echo = echo or (lambda _: None)
    s, models, grid_seeds, pairs, root, ident, previous = _resolve(
        models, seeds, out, jobs, config, settings, options, overwrite, values
    )
    redo_all = overwrite and previous is not None and previous.get("identity") != ident
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(root, "create the sweep folder", e) from e
    runs = [SweepRun(m, seed, f"{_safe(m)}-seed{seed}") for m in models for seed in grid_seeds]
    for r in runs:
        found, seconds = _run_state(root / r.path)
        if found in _DONE and not redo_all:
            r.status, r.reused, r.seconds = found, True, seconds
    started = dt.datetime.now().isoformat(timespec="seconds")
    state = {"identity": ident, "started": started, "models": models, "seeds": grid_seeds, "jobs": jobs}
    _write_sweep(root, state, runs, "running")
    todo = [r for r in runs if not r.reused]
    for r in runs:
        if r.reused:
            echo(f"  {r.model} seed {r.seed}: already {r.status}, kept ({r.path})")
    try:
        if jobs == 1:
            for i, r in enumerate(todo, 1):
                echo(f"[{i}/{len(todo)}] {r.model} seed {r.seed} ...")
                _run_here(s, pairs, root, r, progress)
                echo(f"  {r.model} seed {r.seed}: {r.status} in {r.seconds:.0f} s")
                _write_sweep(root, state, runs, "running")
        else:
            _run_parallel(s, pairs, root, todo, jobs, echo, lambda: _write_sweep(root, state, runs, "running"))
    except KeyboardInterrupt:
        for r in todo:
            if r.status in ("pending", "running"):
                r.status = "interrupted" if r.status == "running" else "pending"
        _write_sweep(root, state, runs, "interrupted")
        raise
    agg = aggregate(root, runs)
    doc = _write_sweep(root, state, runs, "complete", agg)
    write_atomic(root / "index.html", render_sweep(doc, root))
    return SweepResult(root, runs, agg)


def _resolve(
    models: Sequence[str],
    seeds: Sequence[int | str],
    out: str | Path | None,
    jobs: int,
    config: Any,
    settings: RunSettings | None,
    options: Sequence[str] | None,
    overwrite: bool,
    values: dict[str, Any],
) -> tuple[RunSettings, list[str], list[int], list[str], Path, dict[str, Any], dict[str, Any] | None]:
    """Check everything before any run: settings, models, seeds, plugins and their options, the dataset, and
    that the sweep folder is new, or a sweep made with the same settings."""
    from .plugins import PluginHost

    for k in ("model", "seed", "out"):
        if k in values:
            raise TypeError(f"sweep() sets {k} itself; pass models=, seeds=, out=")
    s = settings if settings is not None else RunSettings.from_config(config)
    s.update(values, "sweep()")
    s.train_config().validate()
    if s.checkpoint:
        raise ResinspectError(
            "--checkpoint: a sweep trains each model from scratch; analyse a saved model with "
            "`resinspect run --checkpoint`"
        )
    if jobs < 1:
        raise ResinspectError(f"--jobs: must be >= 1, not {jobs}")
    models, seeds = _check_models(models), _parse_seeds(seeds)
    pairs = list(options or [])
    host = PluginHost()
    host.register_extensions()
    s.plugins = host.resolve_names(s.plugins)
    from .data import load_data

    load_data(s.data, s.data_root, s.download, **s.data_args)  # a bad dataset or argument fails here, once
    host.option_registry().resolve(
        s.plugin_tables, pairs, where=f"config {s.config_file}" if s.config_file else "config"
    )  # bad -o values fail here, before any run
    root = Path(out) if out is not None else Path(s.reports_root) / _safe("sweep-" + "-".join(models))[:80]
    ident = _identity(s, pairs)
    kind = folder_kind(root)
    if kind == "run":  # --overwrite replaces a sweep, never turns a run's folder into one
        raise ResinspectError(
            f"sweep {root}: is a run directory (it holds results.json), not a sweep folder; a "
            "sweep never replaces a run: choose another --out"
        )
    previous = None
    if kind == "sweep":
        try:
            previous = _read_json(root / SWEEP_FILE)
        except ResinspectError as e:
            if not overwrite:
                raise ResinspectError(
                    f"{e}. Pass --overwrite to start this sweep again (its runs are redone), or choose another --out"
                ) from None
            previous = {"identity": None}  # unreadable: every run is redone
    if previous is not None and previous.get("identity") is not None:
        # a setting added since that sweep counts as having had its default value
        previous["identity"] = _with_defaults(
            previous.get("identity", {}), _identity(RunSettings(list(s.rows.values())), [])
        )
    if previous is not None and previous.get("identity") != ident:
        if not overwrite:
            diffs = _diff(previous.get("identity", {}), ident)
            raise ResinspectError(
                f"sweep {root / SWEEP_FILE}: the sweep was made with other settings "
                f"({'; '.join(diffs[:4])[:300]}); rerun with the same settings to resume, choose "
                "another --out, or pass --overwrite to redo every run"
            )
    elif kind == "other" and not overwrite:
        raise ResinspectError(
            f"sweep {root}: exists and is not a sweep folder (no {SWEEP_FILE}); choose another "
            "--out or pass --overwrite"
        )
    return s, models, seeds, pairs, root, ident, previous


def _read_json(path: Path) -> dict[str, Any]:
    """sweep.json, checked against its schema (resinspect/sweep-schema.json): any problem names the file and
    the field."""
    from .schema import describe_problem, load_schema, validate

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResinspectError(
            f"sweep {path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}; a truncated file?)"
        ) from None
    except UnicodeDecodeError:
        raise ResinspectError(f"sweep {path}: not a text file") from None
    except OSError as e:
        raise ResinspectError(f"sweep {path}: cannot be read: {e.strerror or e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ResinspectError(f"sweep {path}: not a resinspect sweep file")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise ResinspectError(
            f"sweep {path}: schema version {d.get('schema_version')!r}; this resinspect reads version {SCHEMA_VERSION}"
        )
    problems = validate(d, load_schema("sweep-schema.json"))
    if problems:
        raise ResinspectError(f"sweep {path}: does not match the sweep schema: {describe_problem(problems)}")
    return d


def _write_sweep(
    root: Path, state: dict[str, Any], runs: list[SweepRun], status: str, agg: dict[str, Any] | None = None
) -> dict[str, Any]:
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "started": state["started"],
        "finished": dt.datetime.now().isoformat(timespec="seconds") if status != "running" else None,
        "grid": {"models": state["models"], "seeds": state["seeds"]},
        "jobs": state["jobs"],
        "identity": state["identity"],
        "runs": [
            {
                "model": r.model,
                "seed": r.seed,
                "path": r.path,
                "status": r.status,
                "seconds": r.seconds,
                "reused": r.reused,
                "error": r.error,
            }
            for r in runs
        ],
        "aggregate": agg or {},
    }
    from .results import results_json

    write_atomic(root / SWEEP_FILE, results_json(doc))
    return doc


def _run_here(s: RunSettings, pairs: list[str], root: Path, r: SweepRun, progress: bool) -> None:
    from .runner import run

    clock = time.perf_counter()
    r.status = "running"
    try:
        result = run(
            settings=_combo_settings(s, r.model, r.seed, root / r.path),
            options=pairs,
            progress=progress,
            overwrite=True,
        )
        r.status, r.error = result.status, result.results.error
    except KeyboardInterrupt:
        r.seconds = round(time.perf_counter() - clock, 1)
        raise
    except Exception as e:  # one combination failing must not take the sweep down
        r.status, r.error = "failed", str(e) if isinstance(e, ResinspectError) else f"{type(e).__name__}: {e}"
    r.seconds = round(time.perf_counter() - clock, 1)


def _command(s: RunSettings, pairs: list[str], root: Path, r: SweepRun) -> list[str]:
    c = _combo_settings(s, r.model, r.seed, root / r.path)
    cfg = c.to_toml_dict({})
    cfg.update(copy.deepcopy(c.plugin_tables))
    path = root / ".sweep" / f"{r.path}.toml"
    write_atomic(path, dump_toml(cfg))
    cmd = [
        sys.executable,
        "-m",
        "resinspect",
        "run",
        "--config",
        str(path),
        "--out",
        str(root / r.path),
        "--overwrite",
        "--quiet",
    ]
    for p in pairs:
        cmd += ["-o", p]
    return cmd


def _run_parallel(
    s: RunSettings,
    pairs: list[str],
    root: Path,
    todo: list[SweepRun],
    jobs: int,
    echo: Callable[[str], None],
    saved: Callable[[], object],
) -> None:
    threads = max(
        1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // jobs
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    waiting, active = list(todo), cast("list[tuple[SweepRun, subprocess.Popen[bytes], Any, float]]", [])
    logs = root / ".sweep"
    try:
        while waiting or active:
            while waiting and len(active) < jobs:
                r = waiting.pop(0)
                log = logs / f"{r.path}.log"
                cmd = _command(s, pairs, root, r)
                fh = open(log, "wb")
                active.append(
                    (r, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), fh, time.perf_counter())
                )
                r.status = "running"
                echo(f"  started {r.model} seed {r.seed} ({threads} thread{'s' if threads > 1 else ''})")
            time.sleep(0.2)
            for item in list(active):
                r, proc, fh, clock = item
                if proc.poll() is None:
                    continue
                fh.close()
                active.remove(item)
                r.seconds = round(time.perf_counter() - clock, 1)
                state, _ = _run_state(root / r.path)
                r.status = state if state in _DONE or state in ("failed", "interrupted") else "failed"
                if r.status not in _DONE:
                    tail = (logs / f"{r.path}.log").read_text(encoding="utf-8", errors="replace").strip()
                    r.error = tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"
                echo(f"  {r.model} seed {r.seed}: {r.status} in {r.seconds:.0f} s")
                saved()
    except KeyboardInterrupt:
        for _r, proc, _fh, _ in active:
            proc.terminate()
        for r, proc, fh, _ in active:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            fh.close()
            r.status = "interrupted"
        raise


# -- aggregation --------------------------------------------------------------------------------------
def _key_metrics(r: Results) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for plugin, p in r.plugins.items():
        for s in p.sections:
            for k in s.key_metrics:
                head, _, rest = k.partition("/")
                name = rest if head in ("model", "twin") and rest else k
                keys.setdefault(plugin, [])
                if f"{plugin}/{name}" not in keys[plugin]:
                    keys[plugin].append(f"{plugin}/{name}")
    return keys


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def aggregate(root: Path, runs: Sequence[SweepRun]) -> dict[str, Any]:
    """The sweep's numbers from its complete runs' results.json files alone.

    Each network is put in a family, ``residual`` (a model with residual blocks) or ``plain`` (a plain model,
    or a residual model's trained twin), at a depth (the number the model's name ends in: resnet56 and its twin
    plain56 are depth 56; models without one are numbered by their position in the grid). For every family,
    depth and value of :func:`network_values`: ``mean``, ``std`` (the sample standard deviation over the runs,
    0 for a single run), ``n`` and the ``values`` themselves. Also each plugin's key metrics and the depth
    labels."""
    groups: dict[tuple[str, int], dict[str, list[float]]] = {}
    labels: dict[str, dict[int, list[str]]] = {"residual": {}, "plain": {}}
    keys: dict[str, list[str]] = {}
    model_order = list(dict.fromkeys(r.model for r in runs))
    epochs, classes = 0, 0
    for r in runs:
        if r.status not in _DONE:
            continue
        res = Results.read(root / r.path)
        classes = max(classes, int(res.data.get("num_classes") or 0))
        depth = model_depth(r.model)
        depth = depth if depth is not None else model_order.index(r.model) + 1
        residual = bool(res.model.get("residual_blocks"))
        for role, values in network_values(res).items():
            family = "residual" if role == "model" and residual else "plain"
            name = res.model["name"] if role == "model" else (res.model.get("twin") or {}).get("name", "twin")
            names = labels[family].setdefault(depth, [])
            if name not in names:
                names.append(name)
            g = groups.setdefault((family, depth), {})
            for k, v in values.items():
                g.setdefault(k, []).append(v)
        for plugin, ks in _key_metrics(res).items():
            keys.setdefault(plugin, [])
            keys[plugin] += [k for k in ks if k not in keys[plugin]]
        epochs = max(epochs, max((len(h.get("epochs") or []) for h in res.training.values()), default=0))
    families: dict[str, dict[str, dict[str, Any]]] = {}
    for (family, depth), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        families.setdefault(family, {})[str(depth)] = {k: _stats(v) for k, v in g.items()}
    return {
        "families": families,
        "labels": {f: {str(d): n for d, n in sorted(v.items())} for f, v in labels.items() if v},
        "key_metrics": keys,
        "epochs": epochs,
        "findings": degradation_findings(families, labels, classes),
    }


def _plain_finding(
    words: str, tr: str, train_rises: Any, delta: float, margin: float, chance_error: float | None, classes: int
) -> dict[str, str]:
    """The plain family's finding: it degrades, it is at chance at every depth (``chance_error`` given), or it
    shows no clear degradation."""
    if delta > margin:
        why = (
            "Training error rises too, so it is not overfitting: the degradation problem of He et al. 2016."
            if train_rises
            else ""
        )
        return {"severity": "info", "text": f"The plain networks degrade with depth: {words}{tr}. {why}"}
    if chance_error is not None:
        return {
            "severity": "warning",
            "text": f"The plain networks learned nothing at any depth: {words} — chance-level error is "
            f"{chance_error:.1%} with {classes} classes. Depth cannot degrade them further, so this sweep cannot "
            "show the degradation problem; the shortcuts are what lets the network train at all.",
        }
    return {
        "severity": "info",
        "text": "The plain networks show no clear degradation with depth in "
        f"this sweep (a rise of more than {margin:.1f} points): {words}{tr}. He et al. 2016 saw it "
        "from 20 to 56 layers on CIFAR-10 after 64 000 iterations; it may need deeper networks or longer "
        "training here.",
    }


def degradation_findings(
    families: dict[str, dict[str, dict[str, Any]]], labels: dict[str, Any], classes: int = 0
) -> list[dict[str, str]]:
    """Does the plain family degrade with depth (He et al. 2016), does the residual one not, by how much.
    ``classes``: the dataset's class count, to tell a family at chance at every depth (nothing to degrade)."""
    out: list[dict[str, str]] = []
    chance_error = 1 - 1 / classes if classes > 1 else None
    change: dict[str, tuple[float, float | None]] = {}
    for family in ("plain", "residual"):
        by_depth = {int(d): v for d, v in families.get(family, {}).items() if "test_error" in v}
        if len(by_depth) < 2:
            continue
        lo, hi = min(by_depth), max(by_depth)
        a, b = by_depth[lo]["test_error"], by_depth[hi]["test_error"]
        delta = (b["mean"] - a["mean"]) * 100
        se = None
        if a["n"] > 1 and b["n"] > 1:
            se = 100 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        change[family] = (delta, se)
        margin = 2 * se if se is not None else 1.0
        how = f"± {se:.1f} standard error" if se is not None else "one seed per depth: no error bar"
        words = (
            f"test error {a['mean']:.1%} at depth {lo} and {b['mean']:.1%} at depth {hi} ({delta:+.1f} points, {how})"
        )
        tr = ""
        if "train_error" in by_depth[lo] and "train_error" in by_depth[hi]:
            tdelta = (by_depth[hi]["train_error"]["mean"] - by_depth[lo]["train_error"]["mean"]) * 100
            tr = f"; training error {tdelta:+.1f} points"
        if family == "plain":
            at_chance = chance_error is not None and all(
                v["test_error"]["mean"] >= chance_error - 0.02 for v in by_depth.values()
            )
            out.append(
                _plain_finding(
                    words, tr, tr and tdelta > 0, delta, margin, chance_error if at_chance else None, classes
                )
            )
        else:
            if delta > margin:
                why = (
                    "Training error rises too: the deeper residual networks may be undertrained at this budget."
                    if tr and tdelta > 0.5
                    else "Training error does not rise, so this is not the degradation problem: the deeper "
                    "networks fit the training set as well and generalise a little worse."
                )
                out.append(
                    {
                        "severity": "warning",
                        "text": f"The residual networks also get worse with depth here: {words}{tr}. {why}",
                    }
                )
            else:
                out.append(
                    {
                        "severity": "good",
                        "text": "The residual networks do not degrade with depth (no rise of "
                        f"more than {margin:.1f} points): {words}{tr}.",
                    }
                )
    both = sorted(set(families.get("plain", {})) & set(families.get("residual", {})), key=int)
    gaps = []
    for d in both:
        p, r = families["plain"][d].get("test_error"), families["residual"][d].get("test_error")
        if p and r:
            gaps.append((int(d), (p["mean"] - r["mean"]) * 100))
    if gaps:
        text = ", ".join(f"{g:+.1f} at depth {d}" for d, g in gaps)
        out.append(
            {
                "severity": "good" if gaps[-1][1] > 1 else "info",
                "text": f"Shortcuts' advantage in test error (plain minus residual, points): {text}.",
            }
        )
    if "plain" in change and "residual" in change:
        gap = change["plain"][0] - change["residual"][0]
        out.append(
            {
                "severity": "info",
                "text": f"From the shallowest to the deepest network, plain error changes "
                f"{change['plain'][0]:+.1f} points and residual error {change['residual'][0]:+.1f}: a "
                f"difference of {gap:.1f} points in how the two families respond to depth.",
            }
        )
    return out


def read_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    """A sweep folder's sweep.json, checked against its schema (a clear error, naming the file and the field,
    for a folder that is not a sweep or a file that is damaged)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise ResinspectError(f"sweep {sweep_dir}: no {SWEEP_FILE} (not a sweep folder)")
    return _read_json(sweep_dir / SWEEP_FILE)


def render_sweep(doc: dict[str, Any], root: Path) -> str:
    from .sweep_report import render_sweep_html

    return render_sweep_html(doc, root)
