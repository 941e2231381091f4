"""Render a run's results to one self-contained HTML file (no network: CSS inline, figures embedded)."""

from __future__ import annotations

import base64
import math
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

from ..results import Results
from .explainer import ANCHORS, EXPLAINER_HTML

__all__ = ["render_html", "ANCHORS"]

_STATUS_TEXT = {
    "complete": "complete",
    "plugins_failed": "complete, with failed plugins",
    "failed": "failed",
    "running": "incomplete",
    "interrupted": "interrupted",
}


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    return "" if v is None else str(v)


def _env() -> jinja2.Environment:
    loader = jinja2.PackageLoader("resinspect.report", "templates")
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = _cell
    return env


def render_html(results: Results, config_toml: str) -> str:
    """The report as a string. Every string from results/sections is HTML-escaped by the template."""
    env = _env()
    sections = results.sections()
    css = resources.files("resinspect.report").joinpath("templates/report.css").read_text(encoding="utf-8")
    views, summary = [], []
    for i, s in enumerate(sections):
        anchor = f"section-{i}-{''.join(c if c.isalnum() else '-' for c in s.plugin)}"
        views.append(
            {
                "anchor": anchor,
                "title": s.title,
                "plugin": s.plugin,
                "status": s.status,
                "error": s.error,
                "traceback": s.traceback,
                "explanation": s.explanation,
                "paragraphs": [p.strip() for p in s.explanation.split("\n\n") if p.strip()],
                "docs": s.docs if s.docs in ANCHORS else None,
                "findings": s.findings,
                "metrics": s.metrics,
                "tables": s.tables,
                "figures": [
                    {
                        "title": f.title,
                        "caption": f.caption,
                        "alt": f.alt,
                        "b64": base64.b64encode(f.png).decode("ascii"),
                    }
                    for f in s.figures
                ],
            }
        )
        summary += [{"text": f.text, "severity": f.severity, "plugin": s.plugin, "anchor": anchor} for f in s.findings]
        if s.status == "failed":
            summary.append(
                {"text": f"The plugin failed: {s.error}", "severity": "critical", "plugin": s.plugin, "anchor": anchor}
            )
    order = {"critical": 0, "warning": 1, "good": 2, "info": 3}
    summary.sort(key=lambda f: order[f["severity"]])
    model, env_info, run, status = results.model, results.environment, results.run, results.status
    run_info = [
        ("run directory", run.dir),
        ("started", run.started),
        ("finished", run.finished or ""),
        ("duration", f"{run.seconds or 0:.1f} s"),
        ("peak memory", f"{run.peak_rss_mb:,.0f} MiB resident" if run.peak_rss_mb else "not measured"),
        ("device", env_info.get("device", "")),
        ("torch threads", str(env_info.get("torch_threads", ""))),
        ("python", env_info.get("python", "")),
        ("packages", ", ".join(f"{k} {v}" for k, v in env_info.get("packages", {}).items())),
        ("dataset", ", ".join(f"{k}={v}" for k, v in results.data.items())),
    ]
    if results.plugins:
        run_info.append(("plugins: seconds (estimated), peak memory", _plugins_line(results)))
    if results.tensorboard:
        run_info.append(("TensorBoard", _tensorboard_line(results.tensorboard)))
    footer = (
        "Report complete."
        if status in ("complete", "plugins_failed")
        else "This run did not complete; results are partial."
    )
    return env.get_template("report.html").render(
        version=results.resinspect_version,
        schema_version=results.schema_version,
        status=status,
        status_text=_STATUS_TEXT.get(status, status),
        error=results.error,
        model_name=model.get("name", "?"),
        twin_name=(model.get("twin") or {}).get("name"),
        data_name=results.data.get("name", "?"),
        run_name=run.name,
        started=run.started,
        parameters=f"{model.get('parameters', 0):,}",
        n_blocks=len(model.get("residual_blocks", [])),
        sections=views,
        summary=summary,
        explainer=Markup(EXPLAINER_HTML),
        css=Markup(css),
        failures=[{"plugin": n, "error": p.error} for n, p in results.plugins.items() if p.status == "failed"],
        untrained=model.get("trained") is False,
        missing=[]
        if status in ("complete", "plugins_failed")
        else [str(n) for n in results.config.get("plugins") or [] if n not in results.plugins],
        run_info=run_info,
        config_toml=config_toml,
        footer=footer,
    )


def _plugins_line(results: Results) -> str:
    """Each plugin's measured seconds, the run's estimate made before the analysis, and its peak memory."""
    parts = []
    for name, p in results.plugins.items():
        est = f" (est. {p.estimate_seconds:.1f} s)" if p.estimate_seconds is not None else ""
        peak = f", peak {p.peak['rss_mb']:,.0f} MiB" if "rss_mb" in p.peak else ""
        gpu = f", CUDA {p.peak['cuda_mb']:,.0f} MiB" if "cuda_mb" in p.peak else ""
        parts.append(f"{name} {p.seconds:.1f} s{est}{peak}{gpu}")
    planned: dict[str, Any] = results.environment.get("estimate") or {}
    total = (
        f"; estimated in all {planned['total_seconds']:.1f} s before the analysis" if "total_seconds" in planned else ""
    )
    return "; ".join(parts) + total


def _tensorboard_line(tb: dict) -> str:
    """What the run wrote for TensorBoard's tabs, with the seconds each took, what it skipped and why."""
    parts = [f"{k}: {w.get('what', '')} ({w.get('seconds', 0):.2f} s)" for k, w in tb.get("written", {}).items()]
    parts += [f"{k}: skipped ({why})" for k, why in tb.get("skipped", {}).items()]
    parts += list(tb.get("notes", []))
    return f"tensorboard --logdir {tb.get('logdir', 'tb')} — " + "; ".join(parts)
