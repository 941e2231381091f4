"""Gradient flow while training: per-parameter gradient norms, and per residual block the split of the
input gradient into what flows back through the skip and through the branch.

For y = x + F(x): dL/dx = dL/dy + J_F^T dL/dy. The first term arrives through
the skip, the second through the branch; their ratio per block shows which
path the gradient actually uses (He et al. 2016, Identity Mappings, eqs. 4–5).
"""

from __future__ import annotations

import statistics

import numpy as np

from resinspect import Section, StashKey, hookimpl, pyplot
from resinspect_plugins._gradrecorder import BRANCH as _BRANCH
from resinspect_plugins._gradrecorder import OUT as _OUT
from resinspect_plugins._gradrecorder import SKIP as _SKIP
from resinspect_plugins._gradrecorder import TOTAL as _TOTAL
from resinspect_plugins._gradrecorder import GradRecorder

NAME = "gradflow"

EXPLANATION = """\
During training, after every backward pass (or every k steps, option every), gradflow records for each \
parameter tensor the L2 norm, mean |g| and max |g| of its gradient, with batched tensor operations and a \
device-side buffer (no per-parameter synchronisation).

For every residual block y = post(F(x) + S(x)) it also records the gradient arriving at the block's output \
and, separately, what the block passes back to its input through the skip (S) and through the branch (F): \
autograd computes dL/dx = J_S^T g + J_F^T g, and the two terms are kept apart by letting each path read its own \
view of x. A branch/skip ratio well below 1 means the gradient travels mostly along the shortcut — the \
mechanism by which residual networks avoid vanishing gradients.

The heatmaps show log10 of each layer's gradient norm over training; the profiles show it over depth at \
initialisation, early in training and at the end. In a plain network the gradient typically shrinks towards \
the input layers (or becomes erratic); the ratio of the first layer's gradient norm to the last layer's \
summarises this in one number."""

KEY = StashKey[dict]()


@hookimpl
def resinspect_addoptions(options):
    options.add("every", int, 1, "record parameter gradient norms every k-th training step", bounds="[1, 1_000_000]")
    options.add(
        "block_every",
        int,
        10,
        "split each block's input gradient into skip and branch parts every k-th "
        "recorded step (a split step costs about a tenth more: an extra view and four hooks per block)",
        bounds="[1, 1_000_000]",
    )
    options.add(
        "vanish_ratio",
        float,
        1e-3,
        "a layer vanishes at a step when its gradient norm is below this fraction of the median layer's",
        bounds="(0, 1]",
    )
    options.add(
        "explode_ratio",
        float,
        1e3,
        "a layer explodes at a step when its gradient norm is above this multiple of the median layer's",
        bounds="(1, 1e12]",
    )
    options.add(
        "tensorboard_every",
        int,
        5,
        "write per-layer gradient norms to TensorBoard for every k-th recorded "
        "step (0: no TensorBoard scalars; branch/skip ratios follow block_every)",
        bounds="[0, 1_000_000]",
    )


def _state(ctx) -> dict[str, GradRecorder]:
    return ctx.stash.setdefault(KEY, {})


@hookimpl
def resinspect_train_start(ctx, trainee):
    opts = ctx.options(NAME)
    rec = GradRecorder(trainee.role, trainee.model, opts["every"], opts["block_every"])
    rec.attach(ctx.device, ctx.blocks(trainee.role))
    _state(ctx)[trainee.role] = rec


@hookimpl
def resinspect_after_backward(ctx, step):
    _state(ctx)[step.role].record(step.step)


@hookimpl
def resinspect_epoch_end(ctx, epoch):
    rec = _state(ctx).get(epoch.role)
    if rec is None:
        return
    start, params, blocks = rec.unwritten()
    tapped = set(rec.block_rows)
    every = ctx.options(NAME)["tensorboard_every"]
    if not ctx.tensorboard.enabled or not every:
        return
    weight_idx = [i for i, p in enumerate(rec.params) if p.dim() > 1]
    for r in range(len(params)):
        values: dict[str, float] = {}
        if (start + r) % every == 0:
            values.update((f"grad_norm/{rec.names[i]}", params[r, 0, i]) for i in weight_idx)
        for j, name in enumerate(rec.block_names if start + r in tapped else []):
            skip = blocks[r, j, _SKIP]
            if skip > 0:
                values[f"branch_skip_ratio/{name}"] = blocks[r, j, _BRANCH] / skip
        ctx.log_scalars(values, rec.steps[start + r], role=rec.role)


@hookimpl
def resinspect_train_end(ctx, trainee):
    rec = _state(ctx).get(trainee.role)
    if rec is not None:
        rec.detach()


@hookimpl
def resinspect_unconfigure(ctx):
    for rec in _state(ctx).values():
        rec.detach()


def _weight_view(rec: GradRecorder, params: np.ndarray) -> tuple[list[str], np.ndarray]:
    idx = [i for i, p in enumerate(rec.params) if p.dim() > 1]
    return [rec.names[i] for i in idx], params[:, :, idx]


@hookimpl
def resinspect_estimate(ctx) -> float:
    """Nothing to compute: the gradients were recorded during training."""
    return 0.0


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options(NAME)
    s = Section(title="Gradient flow", explanation=EXPLANATION, docs="explainer-gradient")
    s.key_metrics = ["model/first_last_ratio_median", "model/branch_skip_ratio_median"]
    recs = _state(ctx)
    if not recs or not any(r.steps for r in recs.values()):
        s.finding(
            "No training steps were recorded (the model was not trained in this run, e.g. --epochs 0 "
            "with --checkpoint): gradient flow is measured during training.",
            "info",
        )
        return s
    data = {}
    for role, rec in recs.items():
        params, blocks = rec.arrays()
        names, w = _weight_view(rec, params)
        data[role] = (rec, params, blocks, names, w)
        _param_findings(s, ctx, role, rec, params, opts)
        if len(names) >= 2 and len(w):
            first, last = w[:, 0, 0], w[:, 0, -1]
            ratio = np.where(last > 0, first / np.maximum(last, 1e-30), np.nan)
            s.metrics[f"{role}/first_last_ratio_median"] = float(np.nanmedian(ratio))
            s.metrics[f"{role}/first_last_ratio_init"] = float(ratio[0])
            s.metrics[f"{role}/first_last_ratio_end"] = float(ratio[-1])
            s.metrics[f"{role}/first_layer"] = names[0]
            s.metrics[f"{role}/last_layer"] = names[-1]
        if rec.block_names and len(blocks):
            _block_stats(s, role, rec, blocks)
    if "twin" in data and "model/first_last_ratio_median" in s.metrics and "twin/first_last_ratio_median" in s.metrics:
        r, p = s.metrics["model/first_last_ratio_median"], s.metrics["twin/first_last_ratio_median"]
        # a ratio near 1 means the first and last layers get gradients of the same size
        balanced = abs(np.log10(max(r, 1e-30))) < abs(np.log10(max(p, 1e-30)))
        s.finding(
            f"Residual vs plain: the first layer's gradient norm is {r:.3g}× the last layer's in "
            f"{ctx.model_name} and {p:.3g}× in its plain twin {ctx.twin_name} (median over training; at "
            f"initialisation {s.metrics['model/first_last_ratio_init']:.3g}× vs "
            f"{s.metrics['twin/first_last_ratio_init']:.3g}×): the gradient is "
            + (
                "more evenly spread over depth with shortcuts."
                if balanced
                else "not more evenly spread over depth with shortcuts here."
            ),
            "good" if balanced else "info",
        )
    elif "model/first_last_ratio_median" in s.metrics:
        s.finding(
            f"The first layer's gradient norm is {s.metrics['model/first_last_ratio_median']:.3g}× the last "
            "layer's (median over training).",
            "info",
        )
    _figures(s, ctx, data)
    return s


def _param_findings(s: Section, ctx, role: str, rec: GradRecorder, params: np.ndarray, opts) -> None:
    label = ctx.label(role)
    l2 = params[:, 0, :]
    med = np.median(l2, axis=1, keepdims=True)
    vanish = (l2 < opts["vanish_ratio"] * med).mean(0)
    explode = (l2 > opts["explode_ratio"] * med).mean(0)
    dead = (l2 == 0).all(0)
    rows = []
    for i, name in enumerate(rec.names):
        rows.append(
            [
                name,
                tuple(rec.params[i].shape).__str__(),
                float(np.median(l2[:, i])),
                float(np.median(params[:, 1, i])),
                float(params[:, 2, i].max()),
                float(vanish[i]),
            ]
        )
    s.table(
        f"Gradient statistics per parameter: {label} ({len(l2)} recorded steps)",
        ["parameter", "shape", "median L2 norm", "median mean|g|", "max |g|", "fraction of steps vanishing"],
        rows,
    )
    s.metrics[f"{role}/recorded_steps"] = len(l2)
    for kind, mask, sev in (
        ("vanishing (below the threshold for most steps)", vanish > 0.5, "warning"),
        ("exploding (above the threshold for most steps)", explode > 0.5, "critical"),
        ("dead (gradient exactly zero at every recorded step)", dead, "warning"),
    ):
        names = [rec.names[i] for i in np.flatnonzero(mask)]
        s.metrics[f"{role}/{kind.split()[0]}_parameters"] = len(names)
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            s.finding(f"{label}: {len(names)} parameter tensor(s) {kind}: {shown}.", sev)
    if not (vanish > 0.5).any() and not (explode > 0.5).any() and not dead.any():
        s.finding(
            f"{label}: no vanishing, exploding or dead gradients among {len(rec.names)} parameter tensors.", "good"
        )


def _block_stats(s: Section, role: str, rec: GradRecorder, blocks: np.ndarray) -> None:
    skip, branch = blocks[:, :, _SKIP], blocks[:, :, _BRANCH]
    ratio = np.where(skip > 0, branch / np.maximum(skip, 1e-30), np.nan)
    rows = []
    medians = []
    for j, name in enumerate(rec.block_names):
        med = float(np.nanmedian(ratio[:, j])) if np.isfinite(ratio[:, j]).any() else float("nan")
        medians.append(med)
        s.metrics[f"{role}/median_branch_skip_ratio/{name}"] = med
        rows.append(
            [
                name,
                float(np.median(blocks[:, j, _OUT])),
                float(np.median(skip[:, j])),
                float(np.median(branch[:, j])),
                float(np.median(blocks[:, j, _TOTAL])),
                med,
                float(ratio[-1, j]),
            ]
        )
    s.table(
        "Gradient through each residual block: skip vs branch (medians over training)",
        ["block", "‖dL/dy‖", "‖skip part‖", "‖branch part‖", "‖dL/dx‖", "branch/skip", "branch/skip at end"],
        rows,
    )
    if role == "model":
        s.block_column("branch/skip gradient", dict(zip(rec.block_names, medians)))
    finite = [m for m in medians if np.isfinite(m)]
    if finite:
        overall = statistics.median(finite)
        s.metrics[f"{role}/branch_skip_ratio_median"] = overall
        heavy = [n for n, m in zip(rec.block_names, medians) if np.isfinite(m) and m > 1]
        text = (
            f"The gradient reaching each block's input flows mostly through the skip: median branch/skip "
            f"ratio {overall:.2f} across {len(finite)} blocks."
            if overall < 1
            else f"The branches carry more gradient than the skips (median branch/skip ratio {overall:.2f})."
        )
        if heavy:
            text += f" Blocks whose branch dominates: {', '.join(heavy[:6])}{' …' if len(heavy) > 6 else ''}."
        s.finding(text, "info")


def _figures(s: Section, ctx, data) -> None:
    plt = pyplot()

    logs = {r: np.log10(np.maximum(d[4][:, 0, :], 1e-30)).T for r, d in data.items() if d[4].size}
    if logs:
        vmin = min(np.percentile(v, 1) for v in logs.values())
        vmax = max(v.max() for v in logs.values())
        fig, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 4.2), squeeze=False)
        for ax, (role, v) in zip(axes[0], logs.items()):
            label = ctx.label(role)
            im = ax.imshow(v, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set(title=label, xlabel="recorded step")
            names = data[role][3]
            if len(names) <= 40:
                ax.set_yticks(range(len(names)), names, fontsize=6)
            else:
                ax.set_ylabel("layer (input → output)")
        fig.colorbar(im, ax=axes[0].tolist(), label="log10 ‖gradient‖")
        s.figure(
            fig,
            "Gradient norm per layer over training",
            "log10 of each weight's gradient L2 norm; rows "
            "from the first layer (top) to the last (bottom)"
            + (", residual network left, plain twin right." if len(logs) > 1 else "."),
        )
        fig, ax = plt.subplots(figsize=(7, 3.6))
        styles = {"model": "-", "twin": "--"}
        # layer for layer: with a twin, plot only the layers both networks have (same names; no projections)
        common = [n for n in data["model"][3] if all(n in d[3] for d in data.values())]
        for role, (_rec, _params, _blocks, names, w) in data.items():
            n = len(w)
            label = ctx.label(role)
            cols = [names.index(c) for c in common] if len(data) > 1 else list(range(len(names)))
            for moment, idx, colour in (
                ("init", 0, "#2c5aa0"),
                ("early", max(0, n // 10), "#e08a00"),
                ("end", n - 1, "#1b7f3b"),
            ):
                ax.plot(w[idx, 0, cols], styles.get(role, "-"), color=colour, label=f"{label} {moment}")
        ax.set(
            yscale="log",
            xlabel="layer index (input → output)" + (", layers shared with the twin" if len(data) > 1 else ""),
            ylabel="gradient L2 norm",
            title="Gradient norm over depth",
        )
        ax.legend(fontsize=7, ncol=2)
        s.figure(
            fig,
            "Gradient profile over depth",
            "At the first recorded step, after 10% of training and at the "
            "end; solid: residual network, dashed: plain twin.",
        )
    rec, _, blocks, _, _ = data["model"]
    if rec.block_names and len(blocks):
        ratio = blocks[:, :, _BRANCH] / np.maximum(blocks[:, :, _SKIP], 1e-30)
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.18 * len(rec.block_names) + 1.5)))
        im = ax.imshow(
            np.log10(np.maximum(ratio.T, 1e-6)),
            aspect="auto",
            cmap="coolwarm",
            vmin=-2,
            vmax=2,
            interpolation="nearest",
        )
        ax.set_yticks(range(len(rec.block_names)), rec.block_names, fontsize=7)
        ax.set(xlabel="recorded step", title="log10(branch / skip) gradient at each block's input")
        fig.colorbar(im, ax=ax)
        s.figure(
            fig,
            "Branch vs skip gradient per block",
            "Blue: the skip carries more of the gradient back to the block's input; red: the branch does.",
        )
