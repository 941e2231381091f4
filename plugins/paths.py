"""Where the gradient really travels: the input gradient decomposed exactly by path length (Veit et al.
2016, §5 and Fig. 6), at initialisation and after training, with the plain twin's single path beside it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from resinspect import Section, capture, eval_mode, hookimpl, no_blocks_reason, pyplot, residual_blocks
from resinspect_plugins._paths import PathSums, path_gradients
from resinspect_plugins.summary import central_range

NAME = "paths"

EXPLANATION = """\
A network of N residual blocks unravels into 2^N paths from its first block to its last: a path of \
length k passes k branches and N − k shortcuts (Veit et al. 2016). At a given input the backward pass is \
linear, so the gradient of the loss reaching the first block's input is exactly the sum g = Σ_k g_k, where \
g_k adds up the contributions of all C(N, k) paths of length k. resinspect computes every g_k exactly, not \
by sampling as the paper did: a stack of N + 1 gradients is carried backwards block by block, the shortcut \
keeping a path's length and the branch adding one (one batched backward pass per block). That the g_k add \
up to the ordinary gradient is checked on every image.

Read the table and the figure as follows. "Paths" is how many paths have that length (Binomial(N, ½): most \
paths are of medium length). "Mean ‖g_k‖" is the size of the gradient all those paths carry together, and \
"per path" divides it by their number. The effective paths are the shortest range of lengths that carries \
90% of the gradient's magnitude. In the paper's trained ResNet-110 they were 5–17 of 54 blocks: far \
shorter than the typical path, because every branch shrinks what passes through it. A plain network has a \
single path, through every layer; its gradient at the same layer is shown for comparison."""


@hookimpl
def resinspect_addoptions(options):
    options.add(
        "samples",
        int,
        256,
        "test images to decompose the gradient of (0: the whole test set)",
        bounds="[0, 100_000_000]",
    )
    options.add(
        "coverage", float, 0.9, "share of the gradient's magnitude the effective path range must carry", bounds="(0, 1]"
    )
    options.add("at_init", bool, True, "also decompose the gradient of the network at initialisation")


def effective_range(share: np.ndarray, coverage: float) -> tuple[int, int, float]:
    """The shortest range of lengths ``[lo, hi]`` whose shares add up to at least ``coverage`` (ties: the
    one carrying most)."""
    n = len(share)
    best = (0, n - 1, float(share.sum()))
    for lo in range(n):
        acc = 0.0
        for hi in range(lo, n):
            acc += share[hi]
            if acc >= coverage - 1e-12:
                width, best_width = hi - lo, best[1] - best[0]
                if width < best_width or (width == best_width and acc > best[2]):
                    best = (lo, hi, acc)
                break
    return best


def _describe(sums: PathSums, coverage: float) -> dict:
    n = sums.n_blocks
    mean, std = sums.mean().numpy(), sums.std().numpy()
    share = mean / max(mean.sum(), 1e-300)
    counts = np.array([math.comb(n, k) for k in range(n + 1)], dtype=float)
    lo, hi, mass = effective_range(share, coverage)
    mass = float(mass)
    return {
        "mean": mean,
        "std": std,
        "share": share,
        "per_path": mean / counts,
        "counts": counts,
        "low": lo,
        "high": hi,
        "mass": mass,
        "mean_length": float((np.arange(n + 1) * share).sum()),
        "total": sums.total_norm_sum / max(1, sums.count),
        "error": sums.max_rel_error,
    }


def _at_init(ctx):
    fresh = ctx.initial_network("model")
    return None if fresh is None else fresh.eval()


def _twin_single_path(ctx, first_block: str, limit: int) -> float | None:
    """The plain twin's mean per-image gradient norm at the input of the layers named like the first block."""
    pairs = dict((b.name, t) for b, t in ctx.twin_counterparts())
    module = pairs.get(first_block)
    if module is None:
        return None
    total, count = 0.0, 0
    with eval_mode(ctx.twin):
        for x, y in ctx.test_batches(limit):
            with (
                capture({first_block: module}, detach=False, outputs=False, first_only=True) as seen,
                torch.enable_grad(),
            ):
                loss = torch.nn.functional.cross_entropy(ctx.twin(x.detach().requires_grad_(True)), y, reduction="sum")
                (g,) = torch.autograd.grad(loss, seen.inputs[first_block])
            total += float(g.flatten(1).double().norm(dim=1).sum())
            count += len(y)
    return total / max(1, count)


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options()
    s = Section(title="Paths: the gradient decomposed by path length", explanation=EXPLANATION, docs="explainer-paths")
    s.key_metrics = ["trained/effective_low", "trained/effective_high", "trained/gradient_weighted_length"]
    if ctx.task.is_language:
        return s.skip("the path decomposition is of the gradient with respect to the input, and token ids have none")
    blocks = ctx.blocks("model")
    if not blocks:
        s.finding(
            f"{ctx.model_name} has no residual blocks ({no_blocks_reason(blocks)}): nothing to decompose.",
            "warning" if getattr(blocks, "untraced", None) else "info",
        )
        return s
    n = len(blocks)
    at_init = opts["at_init"] and ctx.trained_in_run
    if opts["at_init"] and not at_init:
        s.finding(
            "Not decomposed at initialisation: nothing was trained in this run, so the initial weights are "
            "the analysed ones.",
            "info",
        )
    images = _fit_images(ctx, s, n, opts["samples"], 2 if at_init else 1)
    at_once = max(1, int(AT_ONCE_MACS // ((n + 3) * ctx.multiply_adds())))  # memory: images × blocks
    described = {
        "trained": _describe(
            path_gradients(ctx.model, blocks, ctx.test_batches(images), ctx.progress, at_once), opts["coverage"]
        )
    }
    init = _at_init(ctx) if at_init else None
    if init is not None:
        described["init"] = _describe(
            path_gradients(init, residual_blocks(init), ctx.test_batches(images), ctx.progress, at_once),
            opts["coverage"],
        )
    twin = _twin_single_path(ctx, blocks[0].name, images) if ctx.twin is not None else None
    _report(s, ctx, n, described, twin, opts["coverage"])
    return s


# the images decomposed at once: about this many multiply-adds of forward and (N + 1)-fold backward (resnet50
# at 224 px: 1 image; resnet20 on digits: 204, more than a batch)
AT_ONCE_MACS = 1e11


@hookimpl
def resinspect_estimate(ctx) -> float:
    """Per image ``n + 3`` passes on each network decomposed, and three for the twin's single path."""
    opts = ctx.options()
    blocks = residual_blocks(ctx.model)
    if not blocks or ctx.task.is_language:
        return 0.0
    networks = 2 if opts["at_init"] and ctx.trained_in_run else 1
    images = _fit_images(ctx, Section(title="estimate"), len(blocks), opts["samples"], networks)
    return float(ctx.multiply_adds()) * images * ((len(blocks) + 3) * networks + (3 if ctx.twin is not None else 0))


def _fit_images(ctx, s: Section, n: int, samples: int, networks: int) -> int:
    """The images to decompose, fitted to the run's ``--compute`` budget: one image costs about ``n + 3``
    passes (a forward, and a backward that carries up to ``n + 1`` gradients, one per path length, through
    the blocks: quadratic in depth). At least 8 images are kept."""
    want = ctx.test_images(samples)
    plan = ctx.compute_plan(1)
    got = max(min(want, 8), plan.most((n + 3) * networks, want))
    if got < want:
        plan.cut(f"{got} images decomposed instead of {want} (about {n + 3} passes each, quadratic in the {n} blocks)")
        s.finding(plan.finding(ctx.multiply_adds(), 1) or "", "info")
    return got


def _report(s: Section, ctx, n: int, described: dict, twin: float | None, coverage: float) -> None:
    b_lo, b_hi, _ = central_range(n)
    s.metrics.update({"blocks": n, "binomial_95_low": b_lo, "binomial_95_high": b_hi})
    for state, d in described.items():
        s.metrics.update(
            {
                f"{state}/effective_low": d["low"],
                f"{state}/effective_high": d["high"],
                f"{state}/effective_mass": d["mass"],
                f"{state}/gradient_weighted_length": d["mean_length"],
                f"{state}/gradient_norm": d["total"],
                f"{state}/max_relative_error": d["error"],
            }
        )
        for k in range(n + 1):
            s.metrics[f"{state}/share/{k}"] = float(d["share"][k])
        rows = [
            [
                k,
                int(d["counts"][k]),
                d["counts"][k] / 2**n,
                float(d["mean"][k]),
                float(d["std"][k]),
                float(d["per_path"][k]),
                float(d["share"][k]),
            ]
            for k in range(n + 1)
        ]
        s.table(
            f"Gradient by path length, {ctx.model_name} ({'trained' if state == 'trained' else 'at initialisation'})",
            [
                "length k",
                "paths C(N,k)",
                "fraction of paths",
                "mean ‖g_k‖",
                "std ‖g_k‖",
                "per path",
                "share of magnitude",
            ],
            rows,
            caption=f"Σ_k g_k equals autograd's gradient to {d['error']:.1e} (largest relative difference).",
        )
    d = described["trained"]
    s.finding(
        f"{coverage:.0%} of the gradient's magnitude reaching the first block of {ctx.model_name} comes from "
        f"paths of length {d['low']}–{d['high']} out of {n} blocks, while 95% of its paths have length "
        f"{b_lo}–{b_hi}: "
        + (
            "the effective paths are shorter than the typical path, as Veit et al. found."
            if d["high"] < b_lo
            else "here the effective paths are not shorter than the typical path."
        ),
        "good" if d["high"] < b_lo else "info",
    )
    if "init" in described:
        i = described["init"]
        s.finding(
            f"At initialisation the gradient-weighted mean path length was {i['mean_length']:.1f} "
            f"(effective {i['low']}–{i['high']}); after training it is {d['mean_length']:.1f}.",
            "info",
        )
    if twin is not None:
        s.metrics["twin/single_path_gradient_norm"] = twin
        s.finding(
            f"The plain twin {ctx.label('twin')} has one path, of length {n}: its gradient at the same layer "
            f"has a mean norm of {twin:.3g} per image, against {d['total']:.3g} for {ctx.model_name} (all "
            f"2^{n} paths together) and {float(d['mean'][n]):.3g} for the residual network's own "
            f"length-{n} path.",
            "info",
        )
    _figure(s, ctx, n, described)


def _figure(s: Section, ctx, n: int, described: dict) -> None:
    plt = pyplot()
    k = np.arange(n + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.bar(k, [math.comb(n, j) / 2**n for j in k], color="#cccccc", label="fraction of paths (Binomial)")
    for state, d in described.items():
        a.plot(k, d["share"], "o-" if state == "trained" else "s--", label=f"gradient share, {state}")
        b.plot(k, np.maximum(d["per_path"], 1e-300), "o-" if state == "trained" else "s--", label=state)
    a.set(xlabel="path length k (branches passed)", ylabel="share", title="Which path lengths carry the gradient")
    b.set(xlabel="path length k", ylabel="‖g_k‖ / C(N, k)", yscale="log", title="Gradient per path")
    a.legend(fontsize=8), b.legend(fontsize=8)
    s.figure(
        fig,
        "Gradient by path length",
        f"Left: share of the gradient's magnitude carried by the paths of each "
        f"length (lines) against how many paths have that length (bars), {ctx.model_name}, {n} blocks. Right: "
        "the average gradient one path of each length carries (log scale).",
    )
