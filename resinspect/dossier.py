"""The per-block dossier: one table with a row per residual block gathering what every plugin measured about
it (``Section.per_block`` columns), and the rank correlations between those columns: which measurements agree
on which blocks matter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .section import Section, pyplot

__all__ = ["dossier_section", "columns", "spearman", "ranks"]

EXPLANATION = """One row per residual block, one column per measurement a plugin took of that block (its
Section.per_block columns): for example the accuracy lost when the block is removed (ablation), the
branch-to-skip gradient ratio (gradflow), ||F(x)||/||x|| (activations), 1 - CKA between the block's input and
output (similarity), the median power-law exponent of its layers (spectra), its share of the Hessian trace
(curvature). Every column is oriented so that a larger value means "this block matters more" by that
measurement's own reading (the column's sign says which way the raw number points; a negative sign means the
raw value was negated before ranking).

The second table gives Spearman's rank correlation between every two columns over the blocks both measured:
+1 means the two measurements order the blocks alike, 0 that they are unrelated, -1 that they order them in
reverse. With few blocks a correlation is noisy: with 9 blocks, |rho| has to exceed about 0.68 to be
significant at the 5% level."""


def ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of the tie-averaged ranks); NaN for fewer than 3 pairs or a constant
    input."""
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def columns(sections: Sequence[Section]) -> list[dict[str, Any]]:
    """Every per-block column of ``sections`` (the model's: sections with role None or "model"), in order:
    ``{"key": "<plugin>/<name>", "plugin", "name", "sign", "values": {block: float}}``."""
    out, seen = [], set()
    for s in sections:
        if s.role not in (None, "model") or s.status == "failed":
            continue
        for name, values in s.per_block.items():
            key = f"{s.plugin}/{name}"
            if key in seen or not values:
                continue
            seen.add(key)
            vals = {b: float(v) for b, v in values.items() if _finite(v)}
            out.append(
                {"key": key, "plugin": s.plugin, "name": name, "sign": int(s.block_sign.get(name, 1)), "values": vals}
            )
    return out


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def correlations(cols: Sequence[dict[str, Any]]) -> dict[tuple[int, int], tuple[float, int]]:
    """Spearman rho of every pair of (oriented) columns over their common blocks: ``(i, j) -> (rho, n)``."""
    out = {}
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            common = [b for b in cols[i]["values"] if b in cols[j]["values"]]
            x = [cols[i]["sign"] * cols[i]["values"][b] for b in common]
            y = [cols[j]["sign"] * cols[j]["values"][b] for b in common]
            out[(i, j)] = (spearman(x, y), len(common))
    return out


def dossier_section(blocks: Sequence[dict[str, Any]], sections: Sequence[Section]) -> Section | None:
    """The dossier of the residual blocks ``blocks`` (results.json's ``model.residual_blocks`` rows) from the
    per-block columns of ``sections``; None when there are no blocks or no plugin contributed a column."""
    cols = columns(sections)
    names = [b["name"] for b in blocks]
    cols = [c for c in cols if any(b in c["values"] for b in names)]
    if not names or not cols:
        return None
    s = Section(title="Per-block dossier", plugin="dossier", explanation=EXPLANATION, docs="explainer-paths")
    header = ["block", "stage"] + [
        f"{c['name']} ({c['plugin']}{'; smaller matters more' if c['sign'] < 0 else ''})" for c in cols
    ]
    rows = [[b["name"], b.get("stage", "")] + [c["values"].get(b["name"]) for c in cols] for b in blocks]
    s.table(
        "Every measurement of every block",
        header,
        rows,
        caption="Raw values as each plugin reported them; blank where a plugin did not measure that block.",
    )
    for c in cols:
        known = {b: v for b, v in c["values"].items() if b in names}
        top = max(known, key=lambda b: c["sign"] * known[b])
        s.metrics[f"top/{c['key']}"] = top
    if len(cols) < 2:
        s.finding(
            f"Only one plugin measured the blocks ({cols[0]['key']}); run more (ablation, gradflow, "
            "activations, similarity, spectra) to see whether the measurements agree."
        )
        return s
    corr = correlations(cols)
    crow = []
    for (i, j), (rho, n) in corr.items():
        s.metrics[f"spearman/{cols[i]['key']}~{cols[j]['key']}"] = rho
        crow.append([cols[i]["key"], cols[j]["key"], n, rho])
    s.table(
        "Rank correlation between the measurements",
        ["measurement", "measurement", "blocks", "spearman rho"],
        crow,
        caption="Over the blocks both measured; columns oriented so that positive means they agree on "
        "which blocks matter.",
    )
    _heatmap(s, cols, corr)
    pairs = [(rho, i, j) for (i, j), (rho, n) in corr.items() if math.isfinite(rho)]
    if pairs:
        best, worst = max(pairs), min(pairs)
        s.metrics["spearman_median"] = float(np.median([r for r, _, _ in pairs]))
        s.finding(
            f"Most in agreement: {cols[best[1]]['key']} and {cols[best[2]]['key']} (rho {best[0]:+.2f}); "
            f"least: {cols[worst[1]]['key']} and {cols[worst[2]]['key']} (rho {worst[0]:+.2f}); median "
            f"rho over {len(pairs)} pairs {s.metrics['spearman_median']:+.2f}.",
            "good" if best[0] > 0.68 else "info",
        )
    tops: dict[str, list[str]] = {}
    for c in cols:
        tops.setdefault(s.metrics[f"top/{c['key']}"], []).append(c["key"])
    block, who = max(tops.items(), key=lambda kv: len(kv[1]))
    if len(who) > 1:
        s.finding(f"{block} matters most by {len(who)} of {len(cols)} measurements ({', '.join(who)}).")
    else:
        s.finding(
            f"The measurements disagree on which block matters most: each of the {len(cols)} names a different block."
        )
    return s


def _heatmap(s: Section, cols: Sequence[dict[str, Any]], corr: dict[tuple[int, int], tuple[float, int]]) -> None:
    plt = pyplot()
    k = len(cols)
    m = np.eye(k)
    for (i, j), (rho, _) in corr.items():
        m[i, j] = m[j, i] = rho
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 0.9 + 0.6 * k))
    im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [c["key"] for c in cols]
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    for i in range(k):
        for j in range(k):
            if math.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="Spearman rho")
    s.figure(
        fig,
        "Do the measurements agree?",
        "Rank correlation of every two per-block measurements (oriented "
        "so that positive means they agree on which blocks matter).",
    )
