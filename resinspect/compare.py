"""Runs side by side, from their results.json files alone (no model needed): ``resinspect compare`` and
:func:`compare`."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup

from .errors import ResinspectError
from .results import Results

__all__ = ["Comparison", "compare", "render_compare_html"]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _same(values: list[Any]) -> bool:
    known = [v for v in values if v is not None]
    if len(known) != len(values):
        return False
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in known):
        a = [float(v) for v in known]
        if any(math.isnan(v) for v in a):
            return all(math.isnan(v) for v in a)
        return all(math.isclose(v, a[0], rel_tol=1e-9, abs_tol=1e-12) for v in a)
    return all(v == known[0] for v in known)


@dataclass
class Comparison:
    """Runs side by side. ``metrics`` and ``config`` are rows ``(name, [value per run])``; ``differences``
    lists the metric rows whose values differ; :meth:`difference` gives run j − run i of one metric.
    ``blocks`` holds the per-block dossier's columns: ``{"<plugin>/<column>": {block: [value per run]}}``."""

    names: list[str]
    results: list[Results]
    config: list[tuple[str, list[Any]]]
    metrics: list[tuple[str, list[Any]]]
    blocks: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @property
    def differences(self) -> list[tuple[str, list[Any]]]:
        return [(k, v) for k, v in self.metrics if not _same(v)]

    def metric(self, name: str) -> list[Any]:
        return dict(self.metrics)[name]

    def difference(self, name: str, i: int = 0, j: int = 1) -> float:
        values = self.metric(name)
        return float(values[j]) - float(values[i])


def compare(run_dirs: Sequence[str | Path]) -> Comparison:
    """Read the runs' results.json files (refusing clearly a folder that is not a run, or a results file of
    another schema version) and line their settings and metrics up."""
    if len(run_dirs) < 2:
        raise ResinspectError("compare needs at least two run directories")
    results = [Results.read(d) for d in run_dirs]
    names = [Path(d).resolve().name for d in run_dirs]
    configs = [_flat(r.config) for r in results]
    keys = sorted({k for c in configs for k in c} - {"out"})
    config = [(k, [c.get(k) for c in configs]) for k in keys]
    config = [(k, v) for k, v in config if not _same(v)]
    flats = [_metrics(r) for r in results]
    mkeys = list(dict.fromkeys(k for f in flats for k in f))
    return Comparison(names, results, config, [(k, [f.get(k) for f in flats]) for k in mkeys], _blocks(results))


def _blocks(results: Sequence[Results]) -> dict[str, dict[str, list[Any]]]:
    from .dossier import columns

    per_run = [{c["key"]: c["values"] for c in columns(r.sections())} for r in results]
    out: dict[str, dict[str, list[Any]]] = {}
    for key in dict.fromkeys(k for cols in per_run for k in cols):
        blocks = list(dict.fromkeys(b for cols in per_run for b in cols.get(key, {})))
        out[key] = {b: [cols.get(key, {}).get(b) for cols in per_run] for b in blocks}
    return out


def _metrics(r: Results) -> dict[str, Any]:
    out = {}
    for role, h in r.training.items():
        epochs = h.get("epochs") or []
        if epochs:
            out[f"train/{role}/test_accuracy"] = epochs[-1].get("test_accuracy")
            out[f"train/{role}/train_loss"] = epochs[-1].get("train_loss")
    out.update({k: v for k, v in r.metrics().items() if isinstance(v, (int, float, str, bool)) or v is None})
    return out


def _curves_png(cmp: Comparison) -> str | None:
    from .section import Figure, pyplot

    series = [
        (name, role, [e.get("test_accuracy") for e in h.get("epochs", [])])
        for name, r in zip(cmp.names, cmp.results)
        for role, h in r.training.items()
    ]
    series = [s for s in series if s[2]]
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, role, acc in series:
        ax.plot(
            range(1, len(acc) + 1), acc, "-" if role == "model" else "--", marker="o", ms=3, label=f"{name} ({role})"
        )
    ax.set(xlabel="epoch", ylabel="test accuracy", title="Training curves")
    ax.legend(fontsize=7)
    return base64.b64encode(Figure.from_matplotlib(fig, "Training curves").png).decode("ascii")


def _findings(cmp: Comparison) -> list[dict[str, Any]]:
    rows = []
    plugins = list(dict.fromkeys(n for r in cmp.results for n in r.plugins))
    for p in plugins:
        per_run = [
            [f.text for s in (r.plugins[p].sections if p in r.plugins else []) for f in s.findings] for r in cmp.results
        ]
        if any(x != per_run[0] for x in per_run):
            rows.append({"plugin": p, "runs": per_run})
    return rows


def _figures(cmp: Comparison) -> list[dict[str, Any]]:
    out = []
    plugins = list(dict.fromkeys(n for r in cmp.results for n in r.plugins))
    for p in plugins:
        per_run = [
            [f for s in (r.plugins[p].sections if p in r.plugins else []) for f in s.figures] for r in cmp.results
        ]
        for i in range(max(len(x) for x in per_run)):
            figs = [x[i] if i < len(x) else None for x in per_run]
            title = next(f.title for f in figs if f is not None)
            out.append(
                {
                    "plugin": p,
                    "title": title,
                    "cells": [None if f is None else base64.b64encode(f.png).decode("ascii") for f in figs],
                }
            )
    return out


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>resinspect: {{ names|join(' vs ') }}</title>
<style>{{ css }} td.differs { background: #fff3cd; font-weight: 600; } .runs img { max-width: 100%; }
table.cmp td, table.cmp th { padding: 2px 8px; }</style></head>
<body><main>
<h1>Comparison of {{ names|length }} runs</h1>
<table class="cmp"><tr><th></th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for label, values in header %}<tr><th>{{ label }}</th>{% for v in values %}<td>{{ v|cell }}</td>{% endfor %}</tr>{% endfor %}
</table>
<h2>Settings that differ</h2>
{% if config %}<table class="cmp"><tr><th>setting</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for k, values in config %}<tr><th>{{ k }}</th>{% for v in values %}<td class="differs">{{ v|cell }}</td>{% endfor %}</tr>{% endfor %}
</table>{% else %}<p>None: the runs were configured alike.</p>{% endif %}
{% if curves %}<h2>Training curves</h2><img alt="test accuracy per epoch of every run" src="data:image/png;base64,{{ curves }}">{% endif %}
<h2>Metrics</h2><p>{{ n_diff }} of {{ metrics|length }} metrics differ (highlighted).</p>
<table class="cmp"><tr><th>metric</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}{% if names|length == 2 %}<th>difference</th>{% endif %}</tr>
{% for k, values, differs, delta in metrics %}<tr><th>{{ k }}</th>{% for v in values %}<td{% if differs %} class="differs"{% endif %}>{{ v|cell }}</td>{% endfor %}{% if names|length == 2 %}<td>{{ delta|cell }}</td>{% endif %}</tr>{% endfor %}
</table>
{% if blocks %}<h2>Per-block dossier</h2><p>What each plugin measured about each residual block (the runs' per-block
dossiers), one table per measurement.</p>
{% for key, rows in blocks.items() %}<h3>{{ key }}</h3><table class="cmp"><tr><th>block</th>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr>
{% for b, values in rows.items() %}<tr><th>{{ b }}</th>{% for v in values %}<td>{{ v|cell }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endfor %}{% endif %}
{% if findings %}<h2>Findings that differ</h2>
{% for f in findings %}<h3>{{ f.plugin }}</h3><table class="cmp runs"><tr>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr><tr>
{% for texts in f.runs %}<td><ul>{% for t in texts %}<li>{{ t }}</li>{% endfor %}</ul></td>{% endfor %}</tr></table>{% endfor %}{% endif %}
{% if figures %}<h2>Figures side by side</h2>
{% for f in figures %}<h3>{{ f.plugin }}: {{ f.title }}</h3><table class="cmp runs"><tr>{% for n in names %}<th>{{ n }}</th>{% endfor %}</tr><tr>
{% for b64 in f.cells %}<td>{% if b64 %}<img alt="{{ f.title }}" src="data:image/png;base64,{{ b64 }}">{% else %}(not in this run){% endif %}</td>{% endfor %}</tr></table>{% endfor %}{% endif %}
<footer>Comparison complete.</footer>
</main></body></html>
"""


def render_compare_html(cmp: Comparison) -> str:
    """One self-contained page (CSS inline, figures embedded); every string is HTML-escaped."""
    from .report import _env

    env = _env()  # the run report's: autoescape, strict, the same number formatting
    css = resources.files("resinspect.report").joinpath("templates/report.css").read_text(encoding="utf-8")
    header = [
        ("model", [r.model.get("name") for r in cmp.results]),
        ("data", [r.data.get("name") for r in cmp.results]),
        ("status", [r.status for r in cmp.results]),
        ("started", [r.run.started for r in cmp.results]),
    ]
    rows = []
    for k, values in cmp.metrics:
        differs = not _same(values)
        delta = None
        if len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            delta = float(values[1]) - float(values[0])
        rows.append((k, values, differs, delta))
    return env.from_string(_TEMPLATE).render(
        names=cmp.names,
        header=header,
        config=cmp.config,
        metrics=rows,
        n_diff=len(cmp.differences),
        findings=_findings(cmp),
        blocks=cmp.blocks,
        figures=_figures(cmp),
        curves=_curves_png(cmp),
        css=Markup(css),
    )
