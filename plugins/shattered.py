"""Do gradients look like noise? Shattered gradients along lines through input space (Balduzzi et al.
2017), residual network against its plain twin, at initialisation and trained, plus the paper's toy."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from resinspect import Section, hookimpl, pyplot
from resinspect_plugins._shattered import (
    ToyPlain,
    ToyResidual,
    autocorrelation,
    correlation_matrix,
    decay_length,
    input_gradients,
    line_points,
    sequence_autocorrelation,
    toy_factory,
    toy_gradients,
)

NAME = "shattered"

EXPLANATION = """\
Balduzzi et al. (2017) observed that in a deep plain network the gradient with respect to the input \
decorrelates almost immediately as the input moves, so that it looks like white noise ("shattered"). In a \
residual network it stays correlated over longer distances, like brown noise. A gradient that changes \
unpredictably from one input to the next is a poor guide for optimisation.

Along each line through input space (from a test image to a test image of another class, and from the same \
image along a random direction of the same length) the gradient of the logit of the class predicted at the \
line's start is computed at evenly spaced points. The correlation of two points' gradients (Pearson, over \
the pixels) is averaged over all pairs the same distance apart and over the lines: this is the \
autocorrelation curve. Its value one step apart, and the decay length (the fraction of the line after \
which it first drops below 1/e), summarise it; the matrix shows every pair of points of one line. A linear \
model has the same gradient everywhere: correlation 1 at every distance.

The paper's own toy comes first: one scalar input, 200 units per layer with BatchNorm (training mode, \
over the 256 inputs) and ReLU, a 24-layer plain network against a 50-block residual one, gradients dy/dx at \
256 points of [−2, 2] (Fig. 1), over several random initialisations. The toy shows the effect in its purest \
form, at initialisation. The image version asks whether it holds on your network and data, after training."""


@hookimpl
def resinspect_addoptions(options):
    options.add(
        "lines",
        int,
        2,
        "test images to start lines from (each gives a line to another class and a random one)",
        bounds="[1, 1000]",
    )
    options.add("points", int, 256, "points per line", bounds="[4, 100_000]")
    options.add("batch", int, 128, "points per forward/backward pass", bounds="[1, 65536]")
    options.add("at_init", bool, True, "also measure the networks at initialisation")
    options.add("toy", bool, True, "reproduce the paper's scalar toy (Fig. 1)")
    options.add("toy_seeds", int, 8, "random initialisations of the toy networks", bounds="[1, 1000]")


@hookimpl
def resinspect_register_models(registry):
    registry.add(
        "toy-plain24",
        toy_factory("plain"),
        "Balduzzi et al.'s toy: 24 layers of 200 BN-ReLU units, scalar in and out (input flattened)",
    )
    registry.add(
        "toy-resnet50",
        toy_factory("residual"),
        "Balduzzi et al.'s residual toy: 50 pre-activation blocks of 200 units, scalar in and out (input flattened)",
    )


def _lines(ctx, n_lines: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(start, end) pairs: each start towards a test image of another class, and along a random direction."""
    xs, ys = [], []
    for x, y in ctx.test_batches(0):
        xs.append(x)
        ys.append(y)
        if sum(len(t) for t in ys) >= 4 * n_lines + 8:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(ctx.seed)
    out = []
    for i in range(min(n_lines, len(y))):
        other = (y != y[i]).nonzero()
        end = x[int(other[0])] if len(other) else x[(i + 1) % len(y)]
        out.append((x[i], end))
        direction = torch.randn(x[i].shape, generator=gen).to(x.device)
        out.append((x[i], x[i] + direction * (end - x[i]).norm() / direction.norm()))
    return out


def _measure(net, lines, points: int, batch: int) -> dict:
    curves: list[torch.Tensor] = []
    first: Any = None
    for start, end in lines:
        with torch.no_grad():
            cls = int(net.eval()(start.unsqueeze(0)).argmax(1))
        corr = correlation_matrix(input_gradients(net, line_points(start, end, points), cls, batch))
        curves.append(autocorrelation(corr))
        first = corr if first is None else first
    curve = torch.stack(curves).mean(0)
    return {
        "curve": curve.cpu().numpy(),
        "matrix": first.cpu().numpy(),
        "lag1": float(curve[1]),
        "decay": decay_length(curve),
    }


def _init_copy(ctx, role: str, net):
    state = ctx.initial_state.get(role)
    if state is None:
        return None
    fresh = copy.deepcopy(net)
    fresh.load_state_dict(state)
    return fresh.eval()


def _toy(seeds: int) -> dict:
    out = {}
    for kind, cls in (("plain24", ToyPlain), ("resnet50", ToyResidual)):
        grads, lag1, decays = [], [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            g = toy_gradients(cls())
            ac = sequence_autocorrelation(g)
            grads.append(g)
            lag1.append(float(ac[1]))
            decays.append(decay_length(ac))
        g = torch.stack(grads).double()
        cov = g.T @ g / seeds
        d = cov.diagonal().clamp_min(1e-300).sqrt()
        out[kind] = {
            "grads": g.numpy(),
            "cov": (cov / d[:, None] / d[None, :]).numpy(),
            "lag1": float(np.median(lag1)),
            "decay": _median_or_none(decays),
        }
    return out


def _median_or_none(values):
    known = [v for v in values if v is not None]
    return float(np.median(known)) if len(known) > len(values) / 2 else None


def _fmt(decay: float | None) -> str:
    return "beyond the line" if decay is None else f"{decay:.3f} of the line"


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()
    s = Section(
        title="Shattered gradients: how fast the input gradient decorrelates",
        explanation=EXPLANATION,
        docs="explainer-degradation",
    )
    s.key_metrics = ["model/trained/decay_length", "model/trained/lag1_correlation"]
    if ctx.task.is_language:
        return s.skip("shattered gradients are measured along lines between input images; token ids have none")
    if opts["toy"]:
        toy = _toy(opts["toy_seeds"])
        for kind, t in toy.items():
            s.metrics[f"toy/{kind}/lag1_correlation"] = t["lag1"]
            s.metrics[f"toy/{kind}/decay_length"] = t["decay"]
        p, r = toy["plain24"], toy["resnet50"]
        s.finding(
            f"The paper's toy at initialisation (median over {opts['toy_seeds']} seeds): neighbouring gradients "
            f"correlate {p['lag1']:.2f} in the 24-layer plain network and {r['lag1']:.2f} in the 50-block "
            f"residual one"
            + (
                ": white noise against brown noise, as in Balduzzi et al. Fig. 1."
                if r["lag1"] > p["lag1"] + 0.2
                else ": the paper's contrast does not show here."
            ),
            "good" if r["lag1"] > p["lag1"] + 0.2 else "info",
        )
        _toy_figure(s, toy)
    lines = _lines(ctx, opts["lines"])
    at_init = opts["at_init"] and ctx.trained_in_run
    if opts["at_init"] and not at_init:
        s.finding(
            "Not measured at initialisation: nothing was trained in this run, so the initial weights are "
            "the analysed ones.",
            "info",
        )
    opts = dict(opts, points=_fit_points(ctx, s, len(lines), opts["points"], at_init))
    # memory: a forward and backward of at most about AT_ONCE_MACS multiply-adds at once (the gradients are the
    # same whatever the batch: resnet50 at 224 px takes 12 points at a time)
    opts["batch"] = min(opts["batch"], max(1, int(AT_ONCE_MACS // max(1, ctx.multiply_adds()))))
    results = {}
    for role, net in ctx.networks():
        results[(role, "trained")] = _measure(net, lines, opts["points"], opts["batch"])
        init = _init_copy(ctx, role, net) if at_init else None
        if init is not None:
            results[(role, "init")] = _measure(init, lines, opts["points"], opts["batch"])
    for (role, state), r in results.items():
        s.metrics[f"{role}/{state}/lag1_correlation"] = r["lag1"]
        s.metrics[f"{role}/{state}/decay_length"] = r["decay"]
    s.metrics["lines"], s.metrics["points"] = len(lines), opts["points"]
    s.table(
        "Gradient autocorrelation along lines",
        ["network", "state", "correlation one step apart", "decay length (fraction of the line)"],
        [[ctx.label(role), state, r["lag1"], r["decay"]] for (role, state), r in results.items()],
        caption=f"{len(lines)} lines of {opts['points']} points; decay length: where the mean correlation "
        "first falls below 1/e (empty: never on the line).",
    )
    _findings(s, ctx, results)
    _figures(s, ctx, results)
    return s


AT_ONCE_MACS = 5e10


@hookimpl
def resinspect_estimate(ctx) -> float:
    """A forward and a backward pass (three passes' worth) per point, line, network and state."""
    if ctx.task.is_language:
        return 0.0
    opts = ctx.options()
    at_init = opts["at_init"] and ctx.trained_in_run
    lines = 2 * opts["lines"]
    points = _fit_points(ctx, Section(title="estimate"), lines, opts["points"], at_init)
    return float(ctx.multiply_adds()) * 3 * lines * points * len(ctx.networks()) * (2 if at_init else 1)


def _fit_points(ctx, s: Section, lines: int, points: int, at_init: bool) -> int:
    """Points per line fitted to the run's ``--compute`` budget: each point is a forward and a backward pass
    of one image (about 3 passes' worth), on every line, network and state. At least 16 are kept."""
    plan = ctx.compute_plan(1)
    each = 3 * lines * len(ctx.networks()) * (2 if at_init else 1)
    got = max(min(points, 16), plan.most(each, points))
    if got < points:
        plan.cut(f"{got} points per line instead of {points}")
        s.finding(plan.finding(ctx.multiply_adds(), 1) or "", "info")
    return got


def _findings(s: Section, ctx, results: dict) -> None:
    model = results[("model", "trained")]
    if ("twin", "trained") not in results:
        s.finding(
            f"{ctx.model_name}: neighbouring gradients along the lines correlate {model['lag1']:.2f}; the "
            f"correlation decays {_fmt(model['decay'])}. Run with --twin to compare with the plain network."
        )
        return
    for state in ("trained", "init"):
        if (state == "init") and ("model", "init") not in results:
            continue
        m, t = results[("model", state)], results[("twin", state)]
        m_len = 1.01 if m["decay"] is None else m["decay"]
        t_len = 1.01 if t["decay"] is None else t["decay"]
        smoother = m_len > t_len or (m_len == t_len and m["lag1"] > t["lag1"])
        s.finding(
            f"{'Trained' if state == 'trained' else 'At initialisation'}: the input gradient of "
            f"{ctx.model_name} stays correlated {_fmt(m['decay'])} (one step apart {m['lag1']:.2f}), that "
            f"of the plain twin {ctx.label('twin')} {_fmt(t['decay'])} ({t['lag1']:.2f}): "
            + (
                "the residual network's gradients are less shattered."
                if smoother
                else "the residual network's gradients are not less shattered here."
            ),
            "good" if smoother else "info",
        )


def _figures(s: Section, ctx, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (role, state), r in results.items():
        x = np.linspace(0, 1, len(r["curve"]))
        ax.plot(
            x,
            r["curve"],
            "-" if role == "model" else "--",
            alpha=1.0 if state == "trained" else 0.5,
            label=f"{ctx.label(role)}, {state}",
        )
    ax.axhline(math.exp(-1), color="k", lw=0.6, ls=":")
    ax.set(
        xlabel="distance along the line (fraction)",
        ylabel="mean gradient correlation",
        title="Autocorrelation of the input gradient",
    )
    ax.legend(fontsize=8)
    s.figure(
        fig,
        "Gradient autocorrelation",
        "Mean correlation between the gradients at two points of a line, against their distance; dotted: 1/e.",
    )
    trained = [(role, r) for (role, state), r in results.items() if state == "trained"]
    fig, axes = plt.subplots(1, len(trained), figsize=(4.2 * len(trained), 3.8), squeeze=False)
    for ax, (role, r) in zip(axes[0], trained):
        im = ax.imshow(r["matrix"], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set(title=ctx.label(role), xlabel="point", ylabel="point")
    fig.colorbar(im, ax=axes[0].tolist())
    s.figure(
        fig,
        "Gradient correlation matrices",
        "Correlation between the gradients at every two points of the "
        "first line (trained networks); a broad red band means smooth, brown-noise-like gradients, a thin "
        "diagonal means shattered, white-noise-like ones.",
    )


def _toy_figure(s: Section, toy: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    x = np.linspace(-2, 2, toy["plain24"]["grads"].shape[1])
    for col, (kind, title) in enumerate((("plain24", "plain, 24 layers"), ("resnet50", "residual, 50 blocks"))):
        axes[0, col].plot(x, toy[kind]["grads"][0], lw=0.8)
        axes[0, col].set(title=f"dy/dx, {title}", xlabel="x")
        axes[1, col].imshow(toy[kind]["cov"], cmap="RdBu_r", vmin=-1, vmax=1, extent=(-2, 2, 2, -2))
        axes[1, col].set(title=f"gradient covariance, {title}", xlabel="x", ylabel="x")
    fig.tight_layout()
    s.figure(
        fig,
        "The paper's toy (Balduzzi et al. 2017, Fig. 1)",
        "Top: the gradient of the output with respect to "
        "the scalar input over [−2, 2] (first seed). Bottom: its covariance between inputs over the random "
        "initialisations, normalised to correlations.",
    )
