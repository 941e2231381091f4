"""The sweep report: one self-contained HTML page (CSS inline, figures embedded, every string escaped) from a
sweep's sweep.json and its runs' results.json files."""

from __future__ import annotations

import base64
import math
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup

from .rundir import relative_link
from .section import Figure, pyplot

__all__ = ["render_sweep_html"]

_COLOURS = {"residual": "#1f77b4", "plain": "#d62728"}

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>resinspect sweep: {{ models|join(', ') }}</title>
<style>{{ css }}</style></head>
<body><main>
<h1>Sweep: {{ models|join(', ') }} &times; seeds {{ seeds|join(', ') }}</h1>
<p class="meta">{{ n_done }} of {{ runs|length }} runs complete{% if status != 'complete' %}; the sweep is
{{ status }}{% endif %}. Settings: {{ settings }}.</p>
<h2>Findings</h2>
{% if findings %}<ul class="findings">{% for f in findings %}<li class="{{ f.severity }}"><span class="sev">{{ f.severity }}</span>{{ f.text }}</li>{% endfor %}</ul>
{% else %}<p>No finding: the sweep needs at least two depths of a family with complete runs.</p>{% endif %}
<h2 id="degradation">Test error against depth</h2>
<p>He et al. 2016 (Fig. 6, Table 6) trained plain and residual networks of growing depth: the plain ones got
<em>worse</em> with depth, in training error as well as test error (the degradation problem), while the residual ones
did not. Each point is the mean over seeds; error bars are &plusmn; one sample standard deviation.</p>
{% for f in figures_top %}<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
<div class="table-wrap"><table><thead><tr><th>family</th><th>depth</th><th>networks</th><th>runs</th><th>test error</th><th>training error</th></tr></thead><tbody>
{% for r in depth_rows %}<tr><td>{{ r.family }}</td><td>{{ r.depth }}</td><td>{{ r.names }}</td><td>{{ r.n }}</td><td>{{ r.test }}</td><td>{{ r.train }}</td></tr>{% endfor %}
</tbody></table></div>
{% if plugin_figures %}<h2 id="plugins">Plugins' key metrics against depth</h2>
<p>Each plugin's key numbers (mean &plusmn; standard deviation over seeds) for residual and plain networks.</p>
{% for f in plugin_figures %}<h3>{{ f.plugin }}</h3><figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}{% endif %}
{% if metric_rows %}<details class="folded-table"><summary>Every metric reported at every depth of a family ({{ metric_rows|length }} rows)</summary>
<div class="table-wrap long"><table><thead><tr><th>metric</th>{% for c in metric_cols %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for name, cells in metric_rows %}<tr><td>{{ name }}</td>{% for c in cells %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></div></details>{% endif %}
<h2 id="runs">Runs</h2>
<div class="table-wrap"><table><thead><tr><th>model</th><th>seed</th><th>status</th><th>test accuracy</th><th>seconds</th><th>report</th></tr></thead><tbody>
{% for r in runs %}<tr><td>{{ r.model }}</td><td>{{ r.seed }}</td><td>{{ r.status }}{% if r.reused %} (kept){% endif %}</td><td>{{ r.accuracy }}</td><td>{{ r.seconds }}</td><td>{% if r.link %}<a href="{{ r.link }}">{{ r.path }}</a>{% else %}{{ r.path }}{% endif %}</td></tr>{% endfor %}
</tbody></table></div>
<footer>{% if status == 'complete' %}Sweep report complete.{% else %}This sweep did not complete; results are partial.{% endif %}
resinspect sweep.json schema {{ schema_version }}.</footer>
</main></body></html>
"""


def _png(fig: Any, title: str) -> str:
    return base64.b64encode(Figure.from_matplotlib(fig, title).png).decode("ascii")


def _series(families: dict[str, Any], family: str, key: str) -> tuple[list[int], list[float], list[float]]:
    pts = sorted((int(d), v[key]) for d, v in families.get(family, {}).items() if key in v)
    return [d for d, _ in pts], [s["mean"] for _, s in pts], [s["std"] for _, s in pts]


def _error_figure(agg: dict[str, Any]) -> dict[str, str] | None:
    fam = agg.get("families", {})
    if not any(_series(fam, f, "test_error")[0] for f in fam):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for family in ("plain", "residual"):
        for key, style, what in (("test_error", "-", "test"), ("train_error", ":", "training")):
            d, m, s = _series(fam, family, key)
            if d:
                ax.errorbar(
                    d,
                    [100 * x for x in m],
                    yerr=[100 * x for x in s],
                    fmt=style,
                    marker="o",
                    capsize=3,
                    color=_COLOURS[family],
                    label=f"{family}, {what} error",
                )
    ax.set(xlabel="depth (layers)", ylabel="error (%)", title="Error against depth (mean ± std over seeds)")
    ax.legend(fontsize=8)
    title = "Error against depth"
    return {
        "title": title,
        "b64": _png(fig, title),
        "caption": "Solid: test error; dotted: training error at the last epoch. Red: plain networks, blue: residual.",
    }


def _curves_figure(agg: dict[str, Any]) -> dict[str, str] | None:
    fam = agg.get("families", {})
    present = [f for f in ("plain", "residual") if f in fam]
    if not present or not agg.get("epochs"):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, family in zip(axes[0], present):
        depths = sorted(fam[family], key=int)
        for i, d in enumerate(depths):
            v = fam[family][d]
            colour = cmap(i / max(1, len(depths) - 1))
            for key, style in (("test_error_curve", "-"), ("train_error_curve", ":")):
                pts = sorted((int(k.rsplit("/", 1)[1]), s["mean"]) for k, s in v.items() if k.startswith(key + "/"))
                if pts:
                    ax.plot(
                        [e for e, _ in pts],
                        [100 * x for _, x in pts],
                        style,
                        color=colour,
                        label=f"depth {d}" if key == "test_error_curve" else None,
                    )
        ax.set(xlabel="epoch", title=f"{family} networks")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("error (%)")
    title = "Training curves per depth"
    return {
        "title": title,
        "b64": _png(fig, title),
        "caption": "Mean over seeds, per epoch; solid: test error, dotted: training error (He et al. Fig. 6).",
    }


def _plugin_figures(agg: dict[str, Any]) -> list[dict[str, str]]:
    fam = agg.get("families", {})
    out = []
    plt = pyplot()
    for plugin, keys in agg.get("key_metrics", {}).items():
        keys = [k for k in keys if any(_series(fam, f, k)[0] for f in fam)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for family in ("plain", "residual"):
                d, m, s = _series(fam, family, k)
                if d:
                    ax.errorbar(d, m, yerr=s, marker="o", capsize=3, color=_COLOURS[family], label=family)
            ax.set_title(k.split("/", 1)[1], fontsize=9)
            ax.set_xlabel("depth")
            ax.legend(fontsize=7)
        title = f"{plugin}: key metrics against depth"
        out.append(
            {
                "plugin": plugin,
                "title": title,
                "b64": _png(fig, title),
                "caption": f"{plugin}'s key metrics (mean ± std over seeds): " + ", ".join(keys) + ".",
            }
        )
    return out


def _fmt(stat: dict[str, Any] | None, scale: float = 1.0, unit: str = "") -> str:
    if not stat:
        return ""
    m, s = stat["mean"] * scale, stat["std"] * scale
    if not math.isfinite(m):
        return str(m)
    digits = 2 if unit == "%" else 4
    return f"{m:.{digits}g}{unit} ± {s:.{digits - 1 if unit else 2}g}{unit}" if unit else f"{m:.4g} ± {s:.2g}"


def render_sweep_html(doc: dict[str, Any], root: Path) -> str:
    from .report import _env

    agg = doc.get("aggregate") or {}
    fam = agg.get("families", {})
    labels = agg.get("labels", {})
    depth_rows = []
    for family in ("plain", "residual"):
        for d in sorted(fam.get(family, {}), key=int):
            v = fam[family][d]
            te = v.get("test_error")
            depth_rows.append(
                {
                    "family": family,
                    "depth": d,
                    "names": ", ".join(labels.get(family, {}).get(d, [])),
                    "n": te["n"] if te else 0,
                    "test": f"{100 * te['mean']:.2f}% ± {100 * te['std']:.2f}" if te else "",
                    "train": (
                        f"{100 * v['train_error']['mean']:.2f}% ± {100 * v['train_error']['std']:.2f}"
                        if "train_error" in v
                        else ""
                    ),
                }
            )
    cols = [(f, d) for f in ("plain", "residual") for d in sorted(fam.get(f, {}), key=int)]
    common = None
    for f, d in cols:
        names = {k for k in fam[f][d] if "/" in k and not k.startswith(("test_error_curve/", "train_error_curve/"))}
        common = names if common is None else common | names
    metric_rows = []
    for k in sorted(common or []):
        cells = [_fmt(fam[f][d].get(k)) for f, d in cols]
        # every depth of at least one family reports it (per-block metrics of one depth only are left out)
        if any(
            all(cells[i] for i, (f2, _) in enumerate(cols) if f2 == f)
            for f in {f for f, _ in cols}
            if all(k in fam[f][d] for f2, d in cols if f2 == f)
        ):
            metric_rows.append((k, cells))
    runs = []
    for r in doc.get("runs", []):
        acc, link = "", None
        if r["status"] in ("complete", "plugins_failed"):
            link = relative_link(root, f"{r['path']}/index.html")  # only a file inside the sweep folder
            try:
                from .results import Results

                ep = Results.read(root / r["path"]).training.get("model", {}).get("epochs") or []
                acc = f"{ep[-1]['test_accuracy']:.3f}" if ep else ""
            except Exception:  # the page still renders without one run's number
                acc = "?"
        runs.append(
            {**r, "accuracy": acc, "link": link, "seconds": "" if r["seconds"] is None else f"{r['seconds']:.0f}"}
        )
    ident = doc.get("identity", {}).get("settings", {})
    settings = ", ".join(
        f"{k} {','.join(map(str, ident[k])) if isinstance(ident[k], list) else ident[k]}"
        for k in ("data", "epochs", "twin", "plugins")
        if k in ident
    )
    css = resources.files("resinspect.report").joinpath("templates/report.css").read_text(encoding="utf-8")
    top = [f for f in (_error_figure(agg), _curves_figure(agg)) if f]
    return (
        _env()
        .from_string(_TEMPLATE)
        .render(
            models=doc["grid"]["models"],
            seeds=doc["grid"]["seeds"],
            status=doc["status"],
            runs=runs,
            n_done=sum(1 for r in doc.get("runs", []) if r["status"] in ("complete", "plugins_failed")),
            settings=settings,
            findings=agg.get("findings", []),
            figures_top=top,
            depth_rows=depth_rows,
            plugin_figures=_plugin_figures(agg),
            metric_cols=[f"{f} {d}" for f, d in cols],
            metric_rows=metric_rows,
            css=Markup(css),
            schema_version=doc.get("schema_version"),
        )
    )
