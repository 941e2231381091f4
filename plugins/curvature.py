"""Curvature of the training loss: the Hessian's top eigenvalues, its trace with per-block traces from the
same probes, and optionally its eigenvalue density, residual network against plain twin."""

from __future__ import annotations

import numpy as np
import torch

from resinspect import Section, block_module, eval_mode, hookimpl, pyplot
from resinspect_plugins._curvature import HessianOperator, density, hutchinson, top_eigenvalues
from resinspect_plugins._landscape import kept
from resinspect_plugins.landscape import _subset as landscape_subset
from resinspect_plugins.landscape import fitted_finding

NAME = "curvature"

EXPLANATION = """\
The Hessian H of the training loss with respect to the weights says how the loss curves around the trained \
weights: its largest eigenvalue λ_max is the sharpest direction (gradient descent is stable only with a \
learning rate below 2/λ_max), its trace the total curvature summed over all directions. A sharp, \
high-curvature minimum is the number behind a chaotic loss surface; a deep plain network is typically much \
sharper than the same network with shortcuts, which is another way of saying that the shortcuts make it \
trainable.

H has as many rows as the network has weights, so it is never formed: each Hessian-vector product H·v is one \
backward pass through the gradient's own graph (on a fixed subset of the training data, BatchNorm in \
evaluation mode). The top eigenvalues come from the Lanczos method with full reorthogonalisation, which \
needs far fewer products than power iteration. The trace comes from Hutchinson's estimator: for random \
vectors v of ±1 entries, E[vᵀHv] = tr(H); its standard error is reported. The same probes give each \
residual block's own trace (the trace of H's diagonal block for that block's weights: Σ over the block's \
entries of v·(Hv)), so one run gives the curvature per block over depth, and the blocks' traces and the \
rest add up to the whole. Optionally the eigenvalue density by stochastic Lanczos quadrature."""


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 256, "training images the Hessian is taken on (one batch)", bounds="[1, 100_000]")
    options.add("top_k", int, 3, "largest eigenvalues to find", bounds="[1, 100]")
    options.add(
        "tol", float, 1e-3, "stop Lanczos when the top eigenvalues change by less than this (relative)", bounds="(0, 1]"
    )
    options.add("max_iter", int, 100, "most Hessian-vector products for the eigenvalues", bounds="[2, 10_000]")
    options.add("probes", int, 40, "Rademacher probes for the trace", bounds="[2, 10_000]")
    options.add("density", bool, False, "also estimate the eigenvalue density (stochastic Lanczos quadrature)")
    options.add("density_steps", int, 60, "Lanczos steps per density run", bounds="[2, 1000]")


def _subset(ctx, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same fixed training subset as landscape's, as one batch."""
    parts = landscape_subset(ctx, samples)
    return [(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))]


def plan_of(ctx, opts: dict) -> tuple[dict, float, list[str]]:
    """The options fitted to the run's ``--compute`` budget, the multiply-adds they cost and what was cut: a
    Hessian-vector product is a forward, a backward and a backward of that (about five passes) over the
    subset; each network takes up to ``max_iter`` of them for the eigenvalues, ``probes`` for the trace and
    ``density_steps`` for the density. Cut in turn while over the budget: the training images (halved, down
    to 32), the trace's probes (down to 10), the Lanczos iterations (down to 20)."""
    out = dict(opts)
    macs, budget, nets = float(ctx.multiply_adds()), float(ctx.compute), len(ctx.networks())
    out["samples"] = n = ctx.train_images(opts["samples"])

    def cost() -> float:
        products = out["max_iter"] + out["probes"] + (out["density_steps"] if out["density"] else 0)
        return 5.0 * products * out["samples"] * nets * macs

    while budget and cost() > budget and out["samples"] > 32:
        out["samples"] = max(32, out["samples"] // 2)
    while budget and cost() > budget and out["probes"] > 10:
        out["probes"] = max(10, out["probes"] // 2)
    while budget and cost() > budget and out["max_iter"] > 20:
        out["max_iter"] = max(20, out["max_iter"] // 2)
    cuts = [
        f"{out[k]} {what} instead of {v}"
        for k, what, v in (
            ("samples", "training images", n),
            ("probes", "probes for the trace", opts["probes"]),
            ("max_iter", "Hessian-vector products at most for the eigenvalues", opts["max_iter"]),
        )
        if out[k] < v
    ]
    return out, cost(), cuts


@hookimpl
def resinspect_estimate(ctx) -> float:
    return plan_of(ctx, ctx.options())[1]


def block_groups(net: torch.nn.Module, names: list[str]) -> dict[str, list[int]]:
    """Parameter indices of each named block or residual site, in the order of ``net.parameters()``."""
    params = [p for p in net.parameters() if p.requires_grad]
    groups = {}
    for b in names:
        own = {id(p) for p in block_module(net, b).parameters()}
        groups[b] = [i for i, p in enumerate(params) if id(p) in own]
    return groups


def measure(net: torch.nn.Module, batches, blocks: list[str], opts: dict, seed: int) -> dict:
    """Top eigenvalues, trace (with per-block traces) and optionally the density of one network."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    with eval_mode(net), kept(params):
        op = HessianOperator(net, batches, params)
        try:
            top, used = top_eigenvalues(op, opts["top_k"], opts["max_iter"], opts["tol"], gen)
            trace = hutchinson(op, opts["probes"], block_groups(net, blocks), gen)
            dens = density(op, opts["density_steps"], 1, generator=gen) if opts["density"] else None
        finally:
            op.release()
    return {"top": top, "products": used, "trace": trace, "density": dens}


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()
    s = Section(
        title="Curvature: the Hessian's spectrum and trace", explanation=EXPLANATION, docs="explainer-landscape"
    )
    s.key_metrics = ["model/eigenvalue_1", "model/trace"]
    opts, _, cuts = plan_of(ctx, opts)
    said = fitted_finding(ctx, cuts)
    if said:
        s.finding(said, "info")
    batches = _subset(ctx, opts["samples"])
    blocks = {"model": [b.name for b in ctx.blocks("model")]}
    if ctx.twin is not None:
        blocks["twin"] = [b.name for b, m in ctx.twin_counterparts() if m is not None]
    try:
        results = {role: measure(net, batches, blocks[role], opts, ctx.seed) for role, net in ctx.networks()}
    except RuntimeError as e:
        if "derivative for" not in str(e):
            raise
        # a fused kernel (CPU's scaled-dot-product attention) has no second derivative: no Hessian-vector product
        first = str(e).strip().splitlines()[0]
        return s.skip(
            f"the network has an operation without a second derivative, so no Hessian-vector product ({first})"
        )
    for role, r in results.items():
        for k, v in enumerate(r["top"]):
            s.metrics[f"{role}/eigenvalue_{k + 1}"] = v
        s.metrics[f"{role}/trace"] = r["trace"].mean
        s.metrics[f"{role}/trace_stderr"] = r["trace"].stderr
        s.metrics[f"{role}/lanczos_products"] = r["products"]
        for name, (mean, _err) in r["trace"].groups.items():
            s.metrics[f"{role}/block/{name}/trace"] = mean
    s.metrics["samples"] = sum(len(y) for _, y in batches)
    s.table(
        "Curvature",
        [
            "network",
            "λ_max",
            f"top {opts['top_k']} eigenvalues",
            "trace",
            "± standard error",
            "Hessian-vector products (eigenvalues)",
        ],
        [
            [
                ctx.label(role),
                r["top"][0],
                ", ".join(f"{v:.4g}" for v in r["top"]),
                r["trace"].mean,
                r["trace"].stderr,
                r["products"],
            ]
            for role, r in results.items()
        ],
        caption=f"On {s.metrics['samples']} training images, BatchNorm in evaluation mode; trace from "
        f"{opts['probes']} Rademacher probes.",
    )
    names = blocks["model"]
    s.block_column("Hessian trace", {n: results["model"]["trace"].groups[n][0] for n in names})
    cols = ["block", f"trace: {ctx.model_name}"] + ([f"trace: {ctx.label('twin')}"] if "twin" in results else [])
    rows = [
        [n, results["model"]["trace"].groups[n][0]]
        + ([results["twin"]["trace"].groups.get(n, (None,))[0]] if "twin" in results else [])
        for n in names
    ]
    s.table(
        "Per-block Hessian trace",
        cols,
        rows,
        caption="From the same probes as the whole trace; the blocks' "
        "traces plus 'other' (stem, classifier) add up to it.",
    )
    _findings(s, ctx, results)
    _figures(s, ctx, results, names)
    return s


def _findings(s: Section, ctx, results: dict) -> None:
    m = results["model"]
    s.finding(
        f"{ctx.model_name}: largest Hessian eigenvalue {m['top'][0]:.4g} (gradient descent is stable below a "
        f"learning rate of {2 / max(m['top'][0], 1e-12):.3g}), trace {m['trace'].mean:.4g} ± {m['trace'].stderr:.2g}."
    )
    if "twin" in results:
        t = results["twin"]
        ratio = t["top"][0] / m["top"][0] if m["top"][0] > 0 else float("nan")
        sharper = ratio > 1
        s.metrics["twin_to_model_sharpness"] = ratio
        s.finding(
            f"The plain twin {ctx.label('twin')} has λ_max {t['top'][0]:.4g}, {ratio:.2g}× that of {ctx.model_name}; "
            f"trace {t['trace'].mean:.4g} vs {m['trace'].mean:.4g}: "
            + (
                "the plain network sits in the sharper minimum, as the literature on skip connections predicts."
                if sharper
                else "here the residual network is the sharper one."
            ),
            "good" if sharper else "info",
        )


def _figures(s: Section, ctx, results: dict, names: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(names))
    for role, r in results.items():
        vals = [r["trace"].groups.get(n, (np.nan, np.nan)) for n in names]
        ax.errorbar(
            x,
            [v[0] for v in vals],
            yerr=[v[1] for v in vals],
            fmt="o-" if role == "model" else "s--",
            ms=3,
            capsize=2,
            label=ctx.label(role),
        )
    ax.set(xlabel="block", ylabel="Hessian trace of the block", title="Curvature per block")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    s.figure(
        fig,
        "Per-block Hessian trace",
        "Each block's share of the Hessian trace (± standard error over the probes), model and twin.",
    )
    if all(r["density"] is not None for r in results.values()):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for role, r in results.items():
            grid, dens = r["density"]
            ax.plot(grid.numpy(), dens.numpy(), label=ctx.label(role))
        ax.set(xlabel="eigenvalue", ylabel="density", yscale="log", title="Hessian eigenvalue density (SLQ)")
        ax.legend(fontsize=8)
        s.figure(fig, "Eigenvalue density", "Stochastic Lanczos quadrature, Gaussian-smoothed.")
