"""What a plugin returns: a :class:`Section` is data (text, findings, metrics, tables, figures), not HTML.

The core renders sections to HTML, TensorBoard and results.json, and can
re-render the HTML later from results.json alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Section", "Finding", "Table", "Figure", "SEVERITIES", "pyplot"]

SEVERITIES = ("info", "good", "warning", "critical")
FOLD_ROWS = 60
# False in the ranks of a torchrun run that write nothing (all but rank 0): figures are closed, not rendered
RENDER_FIGURES = [True]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to PNG, never to a screen).

    Use it instead of ``import matplotlib.pyplot`` in a plugin: ``plt = pyplot(); fig, ax = plt.subplots()``,
    draw, then ``section.figure(fig, title, caption)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Finding:
    """One plain-language sentence about the model, with a severity from :data:`SEVERITIES`."""

    text: str
    severity: str = "info"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"finding severity '{self.severity}' is not one of {', '.join(SEVERITIES)}")


@dataclass
class Table:
    """Rows of cells under named columns. ``fold``: show the table collapsed (``<details>``) in the report;
    None folds tables of more than :data:`FOLD_ROWS` rows."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    fold: bool | None = None

    @property
    def folded(self) -> bool:
        return self.fold if self.fold is not None else len(self.rows) > FOLD_ROWS

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table '{self.title}': row {i} has {len(row)} cells for {len(self.columns)} columns")


@dataclass
class Figure:
    """A PNG image with a title and caption. Build one from matplotlib with :meth:`from_matplotlib`
    (which closes the matplotlib figure once it is saved: draw everything first)."""

    title: str
    png: bytes
    caption: str = ""
    alt: str = ""

    @classmethod
    def from_matplotlib(cls, fig: Any, title: str, caption: str = "", alt: str = "", dpi: int = 110) -> Figure:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)
        return cls(title=title, png=buf.getvalue(), caption=caption, alt=alt or title)


@dataclass
class Section:
    """A plugin's contribution to the report.

    Attributes:
        title: heading of the section.
        explanation: what the plugin measures and how to read it (plain text; blank lines split paragraphs).
        findings: plain-language results with a severity.
        metrics: flat ``name -> number or string``; numbers also go to TensorBoard as ``<plugin>/<name>``.
        tables, figures: supporting data.
        docs: a link (relative to the docs folder) to the explainer paragraph this section tests.
        role: the network the section is about when it is about one (``"model"`` or ``"twin"``): its metrics
            go to that network's TensorBoard run. None: the model's run; metric names starting with
            ``model/`` or ``twin/`` go to that network's run either way.
        per_block: columns of the run's per-block dossier, ``column -> {block name -> number}`` (block names
            as in ``ctx.blocks()``), about the model's residual blocks; set with :meth:`block_column`. The
            dossier puts every plugin's columns in one table, a row per block, with their rank correlations.
        block_sign: per column, +1 (the default) when a larger value means the block matters more, -1 when it
            means it matters less (CKA between a block's input and output, for example); set through
            :meth:`block_column`'s ``matters_more_when``.
        key_metrics: the names (keys of ``metrics``) of the few numbers that summarise the section; a sweep
            plots them against depth.
        tensorboard_skip: metric names kept out of TensorBoard (they still go to the report and results.json);
            set with ``section.metric(name, value, tensorboard=False)``.
        status: ``ok``; ``skipped`` (set with :meth:`skip`) when the analysis does not apply; ``failed`` (set
            by the host when the plugin raised).
        plugin, error, traceback: filled in by the host.
    """

    title: str
    explanation: str = ""
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    docs: str | None = None
    role: str | None = None
    per_block: dict[str, dict[str, float]] = field(default_factory=dict)
    block_sign: dict[str, int] = field(default_factory=dict)
    key_metrics: list[str] = field(default_factory=list)
    tensorboard_skip: set[str] = field(default_factory=set)
    plugin: str = ""
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None

    def metric(self, name: str, value: Any, tensorboard: bool = True) -> None:
        """``metrics[name] = value``; ``tensorboard=False`` keeps it out of TensorBoard (a per-image or per-pair
        number that would only clutter it). Names may contain ``/``: TensorBoard groups tags by their first
        part, and a leading ``model/`` or ``twin/`` sends the number to that network's run."""
        self.metrics[name] = value
        if tensorboard:
            self.tensorboard_skip.discard(name)
        else:
            self.tensorboard_skip.add(name)

    def finding(self, text: str, severity: str = "info") -> None:
        self.findings.append(Finding(text, severity))

    def skip(self, reason: str) -> Section:
        """Mark the section ``skipped``: the analysis does not apply to this network (a plain network for a
        measurement of residual blocks, a stream the head cannot read). ``reason`` is one line; it becomes the
        section's finding, the report shows the section as skipped, and the plugin's status in results.json is
        ``skipped`` (not ``failed``: nothing went wrong). Returns the section, for ``return s.skip(...)``."""
        self.status = "skipped"
        self.findings.append(Finding(f"Skipped: {reason.rstrip('.')}.", "info"))
        return self

    def table(
        self, title: str, columns: list[str], rows: list[list[Any]], caption: str = "", fold: bool | None = None
    ) -> None:
        self.tables.append(Table(title, columns, rows, caption, fold))

    def figure(self, fig: Any, title: str, caption: str = "", alt: str = "") -> None:
        """Add a matplotlib figure as a PNG; the figure is closed afterwards."""
        if not RENDER_FIGURES[0]:
            import matplotlib.pyplot as plt

            plt.close(fig)
            return
        self.figures.append(Figure.from_matplotlib(fig, title, caption, alt))

    def block_column(
        self, name: str, values: dict[str, float], matters_more_when: str = "larger", *, sign: int | None = None
    ) -> None:
        """Add a column to the per-block dossier: ``values`` maps block names to numbers (blocks without a
        value are left blank). ``matters_more_when``: ``"larger"`` (the default) when a larger value means the
        block matters more (a lesion's accuracy cost), ``"smaller"`` when a larger value means it matters less
        (CKA between a block's input and output: a block that changes little). ``sign=±1`` is the older
        spelling of the same thing."""
        if sign is not None:
            if sign not in (1, -1):
                raise ValueError(f"block column '{name}': sign must be 1 or -1, not {sign!r}")
            matters_more_when = "larger" if sign == 1 else "smaller"
        if matters_more_when not in ("larger", "smaller"):
            raise ValueError(
                f"block column '{name}': matters_more_when must be 'larger' or 'smaller', not {matters_more_when!r}"
            )
        self.per_block[name] = {str(b): float(v) for b, v in values.items() if v is not None}
        if matters_more_when == "smaller":
            self.block_sign[name] = -1
        else:
            self.block_sign.pop(name, None)

    def to_dict(self, figure_files: list[str]) -> dict[str, Any]:
        return {
            "title": self.title,
            "plugin": self.plugin,
            "status": self.status,
            "explanation": self.explanation,
            "docs": self.docs,
            "role": self.role,
            "findings": [{"text": f.text, "severity": f.severity} for f in self.findings],
            "metrics": {k: _jsonable(v) for k, v in self.metrics.items()},
            "tables": [
                {
                    "title": t.title,
                    "columns": t.columns,
                    "rows": [[_jsonable(c) for c in r] for r in t.rows],
                    "caption": t.caption,
                    "fold": t.fold,
                }
                for t in self.tables
            ],
            "figures": [
                {"title": f.title, "caption": f.caption, "alt": f.alt, "file": path}
                for f, path in zip(self.figures, figure_files)
            ],
            "per_block": {c: {b: _jsonable(v) for b, v in col.items()} for c, col in self.per_block.items()},
            "block_sign": dict(self.block_sign),
            "key_metrics": list(self.key_metrics),
            "error": self.error,
            "traceback": self.traceback,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], load_png: Any) -> Section:
        return cls(
            title=d["title"],
            plugin=d.get("plugin", ""),
            status=d.get("status", "ok"),
            explanation=d.get("explanation", ""),
            docs=d.get("docs"),
            role=d.get("role"),
            findings=[Finding(f["text"], f.get("severity", "info")) for f in d.get("findings", [])],
            metrics=dict(d.get("metrics", {})),
            tables=[
                Table(t["title"], t["columns"], t["rows"], t.get("caption", ""), t.get("fold"))
                for t in d.get("tables", [])
            ],
            figures=[
                Figure(f["title"], load_png(f["file"]), f.get("caption", ""), f.get("alt", ""))
                for f in d.get("figures", [])
            ],
            per_block={c: dict(col) for c, col in d.get("per_block", {}).items()},
            block_sign={c: int(v) for c, v in d.get("block_sign", {}).items()},
            key_metrics=list(d.get("key_metrics", [])),
            error=d.get("error"),
            traceback=d.get("traceback"),
        )


def _jsonable(v: Any) -> Any:
    """Numbers, strings, bools and None pass; numpy/torch scalars become Python (NaN/inf are left to
    ``results.results_json``)."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)
