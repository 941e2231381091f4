"""Loss landscapes around the trained weights (Li et al. 2018, Fig. 5): 1-D and 2-D surfaces along
filter-normalised random directions, model and plain twin on the same colour scale."""

from __future__ import annotations

import numpy as np
import torch

from resinspect import Section, eval_mode, hookimpl, pyplot
from resinspect_plugins._landscape import Evaluation, Surface, filter_normalised_direction, grid, nonconvexity, rise

NAME = "landscape"
RADII = (0.25, 0.5, 1.0)

EXPLANATION = """\
Li, Xu, Taylor, Studer and Goldstein (2018) drew the loss around a network's trained weights w along two \
random directions d₁, d₂: L(w + a·d₁ + b·d₂) over a grid of (a, b). Random directions in weight space mean \
little on their own, because a network's function does not change when a layer's filters are rescaled \
(BatchNorm undoes it); they therefore rescale each filter of a direction to the norm of the matching \
filter of the weights ("filter normalisation") and leave BatchNorm parameters and biases unperturbed. \
Then a step of 1 changes every filter by as much as its own size, and surfaces of different networks \
compare. In their Fig. 5 a 56-layer ResNet sits in a smooth, nearly convex basin while its plain twin's \
surface is chaotic, with many local minima: the skip connections keep the loss landscape benign, which is \
one reason the deep residual network trains and the plain one does not.

Here both directions are independent seeded draws; BatchNorm uses its running statistics (evaluation mode), \
as in the paper's default. The loss and accuracy are measured on a fixed subset of the training data at \
every grid point; the 1-D curve along d₁ uses a finer grid. Two numbers summarise the shape: the loss rise \
at radius 0.25, 0.5 and 1 along the 1-D curve (how sharply the loss grows away from the minimum), and the \
non-convexity, the share of grid points where the second difference along a grid axis is negative (0 for \
a convex bowl). The contour plots of model and twin share one colour scale."""


@hookimpl
def resinspect_addoptions(options):
    options.add(
        "resolution",
        int,
        21,
        "grid points per axis of the 2-D surface (on [−span, span])",
        bounds="[3, 201]",
        cost=lambda v: f"{v * v:,} loss evaluations, each over landscape.samples training images",
    )
    options.add("resolution_1d", int, 51, "points of the 1-D curve", bounds="[3, 10_001]")
    options.add(
        "span", float, 1.0, "half-width of the grid in units of the filter-normalised directions", bounds="(0, 100]"
    )
    options.add("samples", int, 256, "training images the loss is measured on at every point", bounds="[1, 100_000]")
    options.add(
        "chunk",
        int,
        1,
        "grid points evaluated in one vectorised forward pass (1: one at a time with "
        "the weights stepped in place, fastest on a CPU; more can fill a GPU)",
        bounds="[1, 1024]",
    )


def plan_of(ctx, opts: dict) -> tuple[dict, float, list[str]]:
    """The options fitted to the run's ``--compute`` budget, the multiply-adds they cost and what was cut:
    every grid point and every point of the curve is a forward pass over the subset, on each network
    (``(resolution² + resolution_1d) · samples · networks`` passes). Cut in turn while over the budget: the
    training images (halved, down to 32), the grid (two points per axis at a time, down to 7×7), the curve
    (halved, down to 11 points); odd counts keep the trained weights on the grid."""
    out = dict(opts)
    macs, budget, nets = float(ctx.multiply_adds()), float(ctx.compute), len(ctx.networks())
    out["samples"] = n = ctx.train_images(opts["samples"])

    def cost() -> float:
        return (out["resolution"] ** 2 + out["resolution_1d"]) * out["samples"] * nets * macs

    cuts = []
    while budget and cost() > budget and out["samples"] > 32:
        out["samples"] = max(32, out["samples"] // 2)
    while budget and cost() > budget and out["resolution"] > 7:
        out["resolution"] = max(7, out["resolution"] - 2)
    while budget and cost() > budget and out["resolution_1d"] > 11:
        out["resolution_1d"] = max(11, (out["resolution_1d"] // 2) | 1)
    if out["samples"] < n:
        cuts.append(f"{out['samples']} training images instead of {n}")
    if out["resolution"] < opts["resolution"]:
        cuts.append(
            f"a {out['resolution']}×{out['resolution']} grid instead of {opts['resolution']}×{opts['resolution']}"
        )
    if out["resolution_1d"] < opts["resolution_1d"]:
        cuts.append(f"{out['resolution_1d']} points on the curve instead of {opts['resolution_1d']}")
    return out, cost(), cuts


def fitted_finding(ctx, cuts: list[str]) -> str | None:
    """The finding that says what fitting to the compute budget cut (None: nothing): the compute plan's own
    sentence, as ablation, paths, shattered and attribution say it."""
    plan = ctx.compute_plan(1)
    plan.cuts.extend(cuts)
    return plan.finding(ctx.multiply_adds(), 1)


@hookimpl
def resinspect_estimate(ctx) -> float:
    return plan_of(ctx, ctx.options())[1]


def _subset(ctx, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed subset of the training data: ``samples`` images of the run's seeded training order (the same
    on every call, so landscape and curvature measure the same subset)."""
    return list(ctx.train_batches(samples))


def _evaluate(surface: Surface, coords: torch.Tensor, ctx) -> Evaluation:
    """Every point of ``coords``; under torchrun each rank evaluates its share of the points (each point's
    numbers are those of one process) and the values are gathered."""
    if ctx is None or ctx.world_size == 1:
        return surface.evaluate(coords)
    mine = ctx.split(list(range(len(coords))))
    ev = (
        surface.evaluate(coords[mine])
        if mine
        else Evaluation(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    )
    loss, acc = torch.empty(len(coords), dtype=torch.float64), torch.empty(len(coords), dtype=torch.float64)
    for idx, part_loss, part_acc in ctx.all_gather((mine, ev.loss.cpu(), ev.accuracy.cpu())):
        if idx:
            loss[idx], acc[idx] = part_loss, part_acc
    return Evaluation(loss, acc)


def measure(net: torch.nn.Module, batches, opts: dict, seed: int, ctx=None) -> dict:
    """The 2-D surface and the 1-D curve of one network (``ctx``: split the points across torchrun's ranks)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters()]
    d1 = filter_normalised_direction(params, gen)
    d2 = filter_normalised_direction(params, gen)
    xs = grid(opts["resolution"], opts["span"])
    line = grid(opts["resolution_1d"], opts["span"])
    with eval_mode(net):
        surface = Surface(net, batches, [d1, d2], chunk=opts["chunk"])
        ev2 = _evaluate(surface, torch.cartesian_prod(xs, xs), ctx)
        ev1 = _evaluate(Surface(net, batches, [d1], chunk=opts["chunk"]), line[:, None], ctx)
    n = len(xs)
    loss2 = ev2.loss.view(n, n)
    return {
        "xs": xs,
        "loss": loss2,
        "accuracy": ev2.accuracy.view(n, n),
        "line": line,
        "curve": ev1.loss,
        "curve_accuracy": ev1.accuracy,
        "nonconvexity": nonconvexity(loss2),
        "rises": {r: rise(line, ev1.loss, r) for r in RADII if r <= opts["span"]},
        "centre": float(ev1.loss[len(line) // 2]),
        "vectorised": surface.vectorised,
    }


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()
    s = Section(title="Loss landscape around the trained weights", explanation=EXPLANATION, docs="explainer-landscape")
    s.key_metrics = ["model/loss_rise_at_1", "model/nonconvexity"]
    opts, _, cuts = plan_of(ctx, opts)
    said = fitted_finding(ctx, cuts)
    if said:
        s.finding(said, "info")
    batches = _subset(ctx, opts["samples"])
    results = {}
    for role, net in ctx.networks():
        results[role] = measure(net, batches, opts, ctx.seed, ctx)
    for role, r in results.items():
        s.metrics[f"{role}/nonconvexity"] = r["nonconvexity"]
        s.metrics[f"{role}/loss_at_centre"] = r["centre"]
        s.metrics[f"{role}/max_loss_on_grid"] = float(r["loss"].max())
        for radius, v in r["rises"].items():
            s.metrics[f"{role}/loss_rise_at_{radius:g}"] = v
        for a, v in zip(r["line"].tolist(), r["curve"].tolist()):
            ctx.log_scalar("landscape/curve_1d", v, int(round((a + opts["span"]) * 1000)), role=role)
    s.metrics["grid_points"] = opts["resolution"] ** 2
    s.metrics["samples"] = sum(len(y) for _, y in batches)
    s.table(
        "Shape of the loss surface",
        [
            "network",
            "loss at the weights",
            "rise at 0.25",
            "rise at 0.5",
            "rise at 1",
            "non-convexity",
            "largest loss on the grid",
        ],
        [
            [
                ctx.label(role),
                r["centre"],
                r["rises"].get(0.25),
                r["rises"].get(0.5),
                r["rises"].get(1.0),
                r["nonconvexity"],
                float(r["loss"].max()),
            ]
            for role, r in results.items()
        ],
        caption=f"{opts['resolution']}×{opts['resolution']} grid on [−{opts['span']:g}, {opts['span']:g}]², "
        f"{s.metrics['samples']} training images; rises along the 1-D curve ({opts['resolution_1d']} points).",
    )
    _findings(s, ctx, results)
    _figures(s, ctx, results)
    return s


def _findings(s: Section, ctx, results: dict) -> None:
    m = results["model"]
    r1 = m["rises"].get(max(m["rises"]))
    s.finding(
        f"{ctx.model_name}: the loss rises by {r1:.3g} at distance {max(m['rises']):g} along a filter-normalised "
        f"direction; {m['nonconvexity']:.0%} of the grid's second differences are negative."
    )
    if "twin" in results:
        t = results["twin"]
        smoother = m["nonconvexity"] < t["nonconvexity"]
        flatter = m["rises"].get(0.5, r1) < t["rises"].get(0.5, r1)
        s.finding(
            f"Residual vs plain: non-convexity {m['nonconvexity']:.0%} vs {t['nonconvexity']:.0%}, loss rise at 0.5 "
            f"{m['rises'].get(0.5, float('nan')):.3g} vs {t['rises'].get(0.5, float('nan')):.3g}: "
            + (
                "the residual network sits in the smoother, flatter basin, as in Li et al. Fig. 5."
                if smoother and flatter
                else "the residual network's basin is the smoother one."
                if smoother
                else "the residual network's basin is the flatter one, though not the smoother."
                if flatter
                else "here the plain twin's surface is not the rougher one; the paper's contrast (ResNet-56 "
                "against plain-56 on CIFAR-10) does not show on this model."
            ),
            "good" if smoother and flatter else "info",
        )


def _figures(s: Section, ctx, results: dict) -> None:
    plt = pyplot()
    from matplotlib.colors import LogNorm

    roles = list(results)
    lo = min(float(r["loss"].min()) for r in results.values())
    hi = max(float(r["loss"].max()) for r in results.values())
    levels = np.geomspace(max(lo, 1e-6), max(hi, lo * 1.01 + 1e-6), 25)
    fig, axes = plt.subplots(1, len(roles), figsize=(4.6 * len(roles), 4), squeeze=False)
    for ax, role in zip(axes[0], roles):
        r = results[role]
        xs = r["xs"].numpy()
        cs = ax.contour(
            xs, xs, r["loss"].numpy().T, levels=levels, cmap="viridis", norm=LogNorm(vmin=levels[0], vmax=levels[-1])
        )
        ax.plot(0, 0, "r+")
        ax.set(title=ctx.label(role), xlabel="direction 1", ylabel="direction 2", aspect="equal")
    fig.colorbar(cs, ax=axes[0].tolist(), label="training loss")
    s.figure(
        fig,
        "Loss contours",
        "Contours of the training loss around the trained weights (red cross) along two "
        "filter-normalised random directions; one logarithmic colour scale for both networks.",
    )
    fig = plt.figure(figsize=(4.8 * len(roles), 4))
    for k, role in enumerate(roles):
        r = results[role]
        ax = fig.add_subplot(1, len(roles), k + 1, projection="3d")
        xs = r["xs"].numpy()
        X, Y = np.meshgrid(xs, xs, indexing="ij")
        ax.plot_surface(
            X,
            Y,
            np.log10(np.maximum(r["loss"].numpy(), 1e-6)),
            cmap="viridis",
            vmin=np.log10(levels[0]),
            vmax=np.log10(levels[-1]),
            linewidth=0,
        )
        ax.set(
            title=ctx.label(role),
            xlabel="d1",
            ylabel="d2",
            zlabel="log10 loss",
            zlim=(np.log10(levels[0]), np.log10(levels[-1])),
        )
    s.figure(fig, "Loss surface", "The same surfaces in 3-D (log10 of the loss), on one vertical scale.")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for role in roles:
        r = results[role]
        ax.plot(r["line"].numpy(), r["curve"].numpy(), "-" if role == "model" else "--", label=ctx.label(role))
    ax.set(xlabel="step along direction 1", ylabel="training loss", yscale="log", title="1-D loss curve")
    ax.legend(fontsize=8)
    s.figure(fig, "1-D loss curves", "The training loss along the first direction, model and twin overlaid.")
