"""Weights during and after training: histograms per epoch, distributions, spectral norms and how far each
layer moved from its initialisation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from resinspect import Section, hookimpl, is_conv, is_linear, pyplot, svd_multiply_adds

NAME = "weights"

EXPLANATION = """\
Every epoch, the histogram of every convolution and linear weight (optionally of every parameter, and of \
every gradient) goes to TensorBoard (tab "Histograms"), as SummaryWriter.add_histogram draws them.

The table describes each weight tensor of a convolution or linear layer after training: mean, standard \
deviation, largest |w|, the fraction of weights near zero (|w| below the near_zero option times the tensor's \
largest |w|), the spectral norm of the weight reshaped to (outputs × inputs·kernel) — an upper bound on how \
much the layer can stretch its input — and the relative change from initialisation ||W − W0|| / ||W0||: how \
much each layer actually learned. In a residual network many blocks can stay close to their initialisation \
and still be useful, because the identity path does the carrying; comparing with the plain twin layer for \
layer shows where the shortcuts let the network learn less."""


@hookimpl
def resinspect_addoptions(options):
    options.add("gradients", bool, False, "also write gradient histograms to TensorBoard each epoch")
    options.add(
        "all_parameters",
        bool,
        False,
        "histograms of every parameter (BatchNorm, biases), not only the convolution and linear weights",
    )
    options.add("bins", int, 64, "histogram buckets", bounds="[2, 10_000]")
    options.add(
        "still_threshold", float, 0.01, "relative change below which a layer 'barely moved'", bounds="(0, 1000]"
    )
    options.add(
        "near_zero", float, 0.01, "|w| below this fraction of the tensor's max |w| counts as near zero", bounds="(0, 1)"
    )
    options.add(
        "max_points", int, 2000, "weights sampled per layer for the distribution plot", bounds="[10, 10_000_000]"
    )


@hookimpl
def resinspect_epoch_end(ctx, epoch):
    if not ctx.tensorboard.enabled:
        return
    opts = ctx.options(NAME)
    params = dict(epoch.model.named_parameters())
    names = list(params) if opts["all_parameters"] else [n for n, _ in layer_weights(epoch.model)]
    for name in names:
        p = params[name]
        ctx.log_histogram(name, p, epoch.epoch, role=epoch.role, bins=opts["bins"])
        if opts["gradients"] and p.grad is not None:
            ctx.log_histogram(f"grad/{name}", p.grad, epoch.epoch, role=epoch.role, bins=opts["bins"])


def layer_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(parameter name, weight)`` of every convolution and linear layer, in registration order."""
    out = []
    for mod_name, m in model.named_modules():
        if (is_conv(m) or is_linear(m)) and m.weight is not None:
            # as stored (a transformers Conv1D's is (in, out)): every statistic here is the same either way
            out.append((f"{mod_name}.weight" if mod_name else "weight", m.weight.detach()))
    return out


def weight_stats(w: torch.Tensor, w0: torch.Tensor | None, near_zero: float) -> dict[str, float]:
    """Statistics of one weight tensor; ``w0`` is its value at initialisation (or None)."""
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1)
    absmax = w.abs().max()
    stats = {
        "mean": w.mean().item(),
        "std": w.std().item() if w.numel() > 1 else 0.0,
        "max_abs": absmax.item(),
        "near_zero": (w.abs() < near_zero * absmax).float().mean().item() if absmax > 0 else 1.0,
        "spectral_norm": torch.linalg.matrix_norm(flat, ord=2).item(),
    }
    if w0 is not None:
        w0 = w0.to(w.device).float()
        n0 = torch.linalg.vector_norm(w0)
        stats["relative_change"] = (torch.linalg.vector_norm(w - w0) / n0).item() if n0 > 0 else float("nan")
        stats["spectral_norm_init"] = torch.linalg.matrix_norm(w0.reshape(w0.shape[0], -1), ord=2).item()
    return stats


def _analyse_network(
    ctx, role: str, model: nn.Module, opts
) -> tuple[list[str], list[dict[str, float]], list[np.ndarray]]:
    init = ctx.initial_state.get(role, {})
    names, stats, samples = [], [], []
    rng = np.random.default_rng(ctx.seed)
    for name, w in layer_weights(model):
        names.append(name)
        stats.append(weight_stats(w, init.get(name), opts["near_zero"]))
        values = w.detach().float().flatten().cpu().numpy()
        if len(values) > opts["max_points"]:
            values = rng.choice(values, opts["max_points"], replace=False)
        samples.append(values)
    return names, stats, samples


@hookimpl
def resinspect_estimate(ctx) -> float:
    """The spectral norm (singular values) of every layer of each network, trained and at initialisation."""
    total = 0.0
    for role, net in ctx.networks():
        states = 2 if ctx.initial_state.get(role) else 1
        total += states * sum(svd_multiply_adds(w.shape) for _, w in layer_weights(net))
    return total


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options(NAME)
    s = Section(title="Weights", explanation=EXPLANATION, docs="explainer-residual")
    s.key_metrics = ["model/median_relative_change"]
    results: dict[str, Any] = {}
    for role, model in ctx.networks():
        label = ctx.label(role)
        names, stats, samples = _analyse_network(ctx, role, model, opts)
        results[role] = (names, stats, samples)
        rows = [
            [
                n,
                st["mean"],
                st["std"],
                st["max_abs"],
                st["near_zero"],
                st["spectral_norm"],
                st.get("relative_change", float("nan")),
            ]
            for n, st in zip(names, stats)
        ]
        s.table(
            f"Weights per layer: {label}",
            ["layer", "mean", "std", "max |w|", "near zero", "spectral norm", "‖W−W0‖/‖W0‖"],
            rows,
        )
        for n, st in zip(names, stats):
            s.metrics[f"{role}/{n}/relative_change"] = st.get("relative_change", float("nan"))
            s.metrics[f"{role}/{n}/spectral_norm"] = st["spectral_norm"]
        changes = [
            (n, st["relative_change"])
            for n, st in zip(names, stats)
            if np.isfinite(st.get("relative_change", float("nan")))
        ]
        if changes:
            s.metrics[f"{role}/median_relative_change"] = float(np.median([c for _, c in changes]))
            still = [n for n, c in changes if c < opts["still_threshold"]]
            if still:
                s.finding(
                    f"{label}: {len(still)} layer(s) barely moved from initialisation (relative change "
                    f"< {opts['still_threshold']:g}): {', '.join(still[:6])}{' …' if len(still) > 6 else ''}.",
                    "info",
                )
            grew = sorted(
                (
                    (n, st["spectral_norm"] / st["spectral_norm_init"])
                    for n, st in zip(names, stats)
                    if st.get("spectral_norm_init")
                ),
                key=lambda t: -t[1],
            )[:3]
            if grew:
                s.finding(
                    f"{label}: spectral norm grew most in "
                    + ", ".join(f"{n} (×{g:.2f})" for n, g in grew)
                    + f"; median relative change of all layers {s.metrics[f'{role}/median_relative_change']:.3f}.",
                    "info",
                )
    if "twin" in results:
        _compare(s, ctx, results)
    _block_column(s, ctx, results["model"])
    _figures(s, ctx, results)
    return s


def _block_column(s: Section, ctx, result: tuple) -> None:
    """The dossier's column: the median relative change from initialisation of each block's weights."""
    names, stats, _ = result
    per = {}
    for b in ctx.blocks("model"):
        changes = [
            st["relative_change"]
            for n, st in zip(names, stats)
            if n.startswith(b.name + ".") and np.isfinite(st.get("relative_change", float("nan")))
        ]
        if changes:
            per[b.name] = float(np.median(changes))
    if per:
        s.block_column("weight change", per)


def _compare(s: Section, ctx, results) -> None:
    names_m, stats_m, _ = results["model"]
    names_t, stats_t, _ = results["twin"]
    twin = dict(zip(names_t, stats_t))
    rows = [
        [
            n,
            st.get("relative_change", float("nan")),
            twin[n].get("relative_change", float("nan")),
            st["spectral_norm"],
            twin[n]["spectral_norm"],
        ]
        for n, st in zip(names_m, stats_m)
        if n in twin
    ]
    if not rows:
        return
    s.table(
        f"Residual vs plain, layer for layer ({ctx.label('model')} vs {ctx.label('twin')})",
        ["layer", "change (residual)", "change (plain)", "spectral norm (residual)", "spectral norm (plain)"],
        rows,
    )
    rm = float(np.nanmedian([r[1] for r in rows]))
    pm = float(np.nanmedian([r[2] for r in rows]))
    s.metrics.update({"shared_layers_median_change_model": rm, "shared_layers_median_change_twin": pm})
    s.finding(
        f"Residual vs plain: over the {len(rows)} layers both networks share, the median relative change "
        f"from initialisation is {rm:.3f} with shortcuts and {pm:.3f} without.",
        "info",
    )


def _figures(s: Section, ctx, results) -> None:
    plt = pyplot()
    import seaborn as sns

    for role, (names, _stats, samples) in results.items():
        if not names:
            continue
        label = ctx.label(role)
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 3.8))
        sns.violinplot(
            data=[v for v in samples], ax=ax, inner=None, cut=0, density_norm="width", linewidth=0.5, color="#9db3d6"
        )
        ax.set_xticks(range(len(names)), names, rotation=75, fontsize=6)
        ax.set(ylabel="weight value", title=f"Weight distribution per layer: {label}")
        s.figure(
            fig,
            f"Weight distributions: {label}",
            "One violin per convolution/linear weight, from a sample of its values, after training.",
        )
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for role, (_names, stats, _) in results.items():
        label = ctx.label(role)
        ax.plot([st.get("relative_change", np.nan) for st in stats], marker="o", ms=3, label=label)
    ax.set(xlabel="layer index (input → output)", ylabel="‖W − W0‖ / ‖W0‖", title="How much each layer learned")
    ax.legend()
    s.figure(
        fig,
        "Relative change from initialisation",
        "Per convolution/linear layer; higher means the layer moved further from its initial weights.",
    )
