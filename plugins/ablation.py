"""Lesion study: bypass residual blocks or remove their skips, and measure what the network loses.

Veit, Wilber & Belongie (2016), "Residual Networks Behave Like Ensembles of
Relatively Shallow Networks": deleting one block of a trained ResNet barely
hurts, deleting one layer of a plain network of the same depth is fatal.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from resinspect import Section, capture, eval_mode, hookimpl, is_batchnorm, no_blocks_reason, pyplot, residual_blocks
from resinspect_plugins._layers import layer_groups, layered, swap_sweep
from resinspect_plugins._lesion import Lesion, LesionStats, applied_lesion, lesion_sweep

NAME = "ablation"

EXPLANATION = """\
Each residual block computes y = x + F(x). A lesion bypasses one block (its output becomes its shortcut: \
the identity, or the projection of a downsampling block) and measures test accuracy without it; skip removal \
does the opposite and keeps only the branch (y = F(x)). Costs are in accuracy points (percentage points) \
relative to the intact network on the same test images.

Veit et al. (2016) unravel a network of N blocks into 2^N paths of different lengths. Bypassing one block \
removes only the paths that pass through its branch and leaves the other half, so a trained ResNet degrades \
gracefully, more so the more blocks it has; downsampling blocks are the exception, because every path \
crosses them. A plain network has a single path: removing any layer pair breaks it. Bypassing k random blocks \
at once shows how the damage grows with k: smoothly for an ensemble, as a cliff for a chain.

Pairwise lesions test the ensemble view directly: if blocks behave like independent members of an ensemble, \
removing two of them costs what removing each costs alone, added up. For every pair of non-downsampling \
blocks (option pair_blocks limits how many) the interaction is the pair's cost minus the two single costs; \
the heatmap shows it, red where the pair hurts more than the sum, blue where less.

Optionally BatchNorm statistics are re-estimated after each lesion (option bn_recalibrate), which separates \
"the block mattered" from "the following layers' statistics shifted". The long version of the \
ensemble-of-paths argument is docs/residual-learning.md, section "An ensemble of paths"."""


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 0, "test images to evaluate (0: the whole test set)", bounds="[0, 100_000_000]")
    options.add(
        "k_max",
        int,
        8,
        "largest number of blocks bypassed together in the random-subset study "
        "(capped at the number of blocks; 0 skips it)",
        bounds="[0, 1000]",
    )
    options.add("subsets", int, 5, "random subsets per k", bounds="[1, 1000]")
    options.add("skip_removal", bool, True, "also remove each block's skip connection in turn")
    options.add(
        "bn_recalibrate",
        bool,
        True,
        "also evaluate each single-block lesion after re-estimating "
        "BatchNorm statistics with the lesion in place (one extra pass per block)",
    )
    options.add("bn_batches", int, 4, "training batches used to re-estimate BatchNorm statistics", bounds="[1, 10_000]")
    options.add(
        "critical_points", float, 5.0, "accuracy cost (points) from which a block counts as critical", bounds="[0, 100]"
    )
    options.add(
        "layers",
        bool,
        True,
        "for a transformer: delete each whole layer (every residual site it holds) and swap each pair of adjacent "
        "layers (Lad et al. 2024)",
    )
    options.add("fast", bool, True, "share the clean pass's block outputs between lesions (same results)")
    options.add(
        "pair_blocks",
        int,
        32,
        "pairwise lesions: every pair among the first this many non-downsampling blocks (0 skips the pairwise study)",
        bounds="[0, 128]",
        cost=lambda v: f"up to {v * (v - 1) // 2:,} lesioned passes over the test images",
    )
    options.add(
        "independent_points",
        float,
        1.0,
        "blocks count as acting independently when the median "
        "|interaction| of a pair is below this many accuracy points (or a quarter of the median pair "
        "cost, whichever is larger)",
        bounds="[0, 100]",
    )


@contextmanager
def _recalibrated(model: nn.Module, batches: list) -> Iterator[None]:
    """Re-estimate BN running statistics on ``batches`` (under whatever lesion is active); restore on exit."""
    bns = [m for m in model.modules() if is_batchnorm(m)]
    saved = [(m, {k: v.clone() for k, v in m.state_dict().items()}, m.momentum, m.training) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        for m in bns:
            m.eval()
        yield
    finally:
        for m, state, momentum, training in saved:
            m.load_state_dict(state)
            m.momentum = momentum
            m.train(training)


def _sweep(ctx, model, blocks, lesions, opts, desc: str, fast: bool) -> tuple[LesionStats, list[LesionStats]]:
    """``lesion_sweep`` on the test images. Under torchrun the lesions are split across the ranks (balanced by
    how much of the network each re-runs), each rank evaluates its share on every test image, and the counts
    are gathered: exactly the numbers of one process."""
    batches = ctx.progress(ctx.test_batches(opts["samples"]), desc=desc)
    if ctx.world_size == 1:
        return lesion_sweep(model, batches, blocks, lesions, fast=fast)
    n = len(blocks)
    mine = ctx.split(list(enumerate(lesions)), cost=lambda item: n + 1 - min(item[1].blocks, default=0))
    clean, stats = lesion_sweep(model, batches, blocks, [lesion for _, lesion in mine], fast=fast)
    got = {i: s for part in ctx.all_gather({i: s for (i, _), s in zip(mine, stats)}) for i, s in part.items()}
    return clean, [got[i] for i in range(len(lesions))]


def _recalibrated_sweep(ctx, model, blocks, lesions, opts) -> list[LesionStats]:
    """Each lesion evaluated after re-estimating BN statistics with the lesion in place (per-lesion passes)."""
    train = list(ctx.train_batches(opts["bn_batches"] * (ctx.train_loader.batch_size or 64)))
    stats = {}
    # independent units of work: under torchrun each rank re-estimates and evaluates its share of the lesions
    for i, lesion in ctx.progress(ctx.split(list(enumerate(lesions))), desc="lesions with BN re-estimated"):
        with applied_lesion(model, blocks, lesion), _recalibrated(model, train):
            stats[i] = lesion_sweep(
                model, ctx.test_batches(opts["samples"]), blocks, [Lesion(lesion.mode, ())], fast=False
            )[1][0]
    if ctx.world_size > 1:
        stats = {i: s for part in ctx.all_gather(stats) for i, s in part.items()}
    return [stats[i] for i in range(len(lesions))]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in model.modules())


def _plain_layer_pairs(twin: nn.Module, names: list[str], probe: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The twin's modules named like the residual blocks whose output shape equals their input shape."""
    candidates = []
    for name in names:
        try:
            candidates.append((name, twin.get_submodule(name)))
        except AttributeError:
            continue
    with capture(candidates, first_only=True) as seen, torch.no_grad():
        twin(probe)
    return [
        (n, m)
        for n, m in candidates
        if n in seen.outputs and tuple(seen.inputs[n].shape) == tuple(seen.outputs[n].shape)
    ]


def _cost(clean: LesionStats, s: LesionStats) -> float:
    return (clean.accuracy - s.accuracy) * 100.0


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options(NAME)
    section = Section(title="Ablation: block lesions and skip removal", explanation=EXPLANATION, docs="explainer-paths")
    section.key_metrics = ["median_lesion_cost_points", "max_lesion_cost_points"]
    model = ctx.model
    blocks = residual_blocks(model)
    if not blocks:
        section.finding(
            f"Nothing to ablate: {ctx.model_name} has no residual blocks ({no_blocks_reason(blocks)}).",
            "warning" if blocks.untraced else "info",
        )
        section.metrics["blocks"] = 0
        return section
    with eval_mode(model):
        return _analyze(ctx, model, blocks, opts, section)


@hookimpl
def resinspect_estimate(ctx) -> float:
    """The lesions' forward passes, as :func:`_fit_to_budget` plans them."""
    blocks = residual_blocks(ctx.model)
    if not blocks:
        return 0.0
    scratch = Section(title="estimate")
    _fit_to_budget(ctx, ctx.model, blocks, ctx.options(NAME), scratch)  # counts the layer study too
    return float(scratch.metrics["planned_multiply_adds"])


def _fit_to_budget(ctx, model, blocks, opts, section: Section) -> dict[str, Any]:
    """The study's optional parts fitted to the run's ``--compute`` budget, in the model's multiply-adds: the
    clean pass and the single-block lesions (and the twin's) always run; then skip removal, BN re-estimation,
    the random subsets and last the pairs (quadratic in blocks) get what is left. Returns the options as
    they will be used, and says in a finding what was cut."""
    n, images = len(blocks), max(1, ctx.test_images(opts["samples"]))
    nets = 2 if ctx.twin is not None else 1
    out = dict(opts)
    # the clean pass and the single lesions run on every image: when even they do not fit, fewer images (at
    # least 32: a lesion cost is then a difference of accuracies over 32 images)
    fit = int(ctx.compute // max(1.0, (1 + n) * nets * ctx.multiply_adds())) if ctx.compute else images
    cut_images = None
    if fit < images and images > 32:
        cut_images, images = images, max(32, fit)
        out["samples"] = images
    plan = ctx.compute_plan(images)
    plan.spend((1 + n) * nets)
    if cut_images:
        plan.cut(f"lesions evaluated on {images} test images instead of {cut_images}")
    if out["skip_removal"] and not plan.fits(n):
        out["skip_removal"] = False
        plan.cut(f"skip removal off ({n} passes)")
    if out["bn_recalibrate"] and _has_batchnorm(model):
        bn_images = min(out["bn_batches"] * (ctx.train_loader.batch_size or 64), ctx.samples or 1 << 62)
        passes = n * (1 + bn_images / images) * (2 if ctx.twin is not None else 1)
        if not plan.fits(passes):
            out["bn_recalibrate"] = False
            plan.cut(f"BN re-estimation after each lesion off ({passes:.0f} passes)")
    if out["layers"] and layered(blocks, ctx.task.is_language):
        groups = len(layer_groups(blocks))
        if not plan.fits(2 * groups - 1):
            out["layers"] = False
            plan.cut(f"layer deletion and swaps off ({2 * groups - 1} passes)")
    k_max = min(out["k_max"], n)
    if k_max:
        fit = plan.most(out["subsets"], k_max)
        if fit < k_max:
            plan.cut(f"random subsets up to k = {fit} instead of {k_max}" if fit else "random-subset study off")
        out["k_max"] = fit
    regular = [i for i, b in enumerate(blocks) if not b.downsamples][: out["pair_blocks"]]
    m = len(regular)
    while m > 1 and not plan.fits(m * (m - 1) / 2):
        m -= 1
    if m < len(regular):
        plan.cut(f"pairwise lesions among the first {m} blocks instead of {len(regular)}" if m > 1 else "pairs off")
        out["pair_blocks"] = m if m > 1 else 0
    said = plan.finding(ctx.multiply_adds(), images)
    if said:
        section.finding(said, "info")
    section.metric("planned_multiply_adds", plan.spent, tensorboard=False)
    return out


def _analyze(ctx, model, blocks, opts, section: Section) -> Section:
    n = len(blocks)
    opts = _fit_to_budget(ctx, model, blocks, opts, section)
    lesions = [Lesion("bypass", (i,)) for i in range(n)]
    if opts["skip_removal"]:
        lesions += [Lesion("drop_skip", (i,)) for i in range(n)]
    k_max = min(opts["k_max"], n)
    rng = random.Random(ctx.seed)
    k_lesions: dict[int, list[Lesion]] = {}
    for k in range(1, k_max + 1):
        k_lesions[k] = [Lesion("bypass", tuple(sorted(rng.sample(range(n), k)))) for _ in range(opts["subsets"])]
        lesions += k_lesions[k]
    regular = [i for i, b in enumerate(blocks) if not b.downsamples][: opts["pair_blocks"]]
    pair_lesions = [Lesion("bypass", (i, j)) for a, i in enumerate(regular) for j in regular[a + 1 :]]
    lesions += pair_lesions
    groups = layer_groups(blocks) if opts["layers"] and layered(blocks, ctx.task.is_language) else []
    lesions += [Lesion("bypass", idx) for _, idx in groups]
    clean, stats = _sweep(ctx, model, blocks, lesions, opts, "lesion sweep (batches)", fast=opts["fast"])
    by_lesion = dict(zip(lesions, stats))
    single = [by_lesion[Lesion("bypass", (i,))] for i in range(n)]
    recal = None
    if opts["bn_recalibrate"] and _has_batchnorm(model):
        recal = _recalibrated_sweep(ctx, model, blocks, [Lesion("bypass", (i,)) for i in range(n)], opts)
    skip = [by_lesion[Lesion("drop_skip", (i,))] for i in range(n)] if opts["skip_removal"] else []
    m = section.metrics
    m.update({"blocks": n, "images": clean.count, "clean_accuracy": clean.accuracy, "clean_loss": clean.loss})
    rows = []
    for i, b in enumerate(blocks):
        cost = _cost(clean, single[i])
        m[f"lesion/{b.name}/accuracy"] = single[i].accuracy
        m[f"lesion/{b.name}/cost_points"] = cost
        row = [b.name, b.stage, b.downsamples, b.shortcut_kind, single[i].accuracy, cost, single[i].loss - clean.loss]
        if recal:
            m[f"lesion_bn/{b.name}/accuracy"] = recal[i].accuracy
            row.append(_cost(clean, recal[i]))
        if skip:
            m[f"skip_removal/{b.name}/accuracy"] = skip[i].accuracy
            row += [skip[i].accuracy, _cost(clean, skip[i])]
        rows.append(row)
        ctx.log_scalar("lesion_accuracy", single[i].accuracy, i)
        if skip:
            ctx.log_scalar("skip_removal_accuracy", skip[i].accuracy, i)
    columns = ["block", "stage", "downsamples", "shortcut", "acc. bypassed", "cost (points)", "Δ loss"]
    if recal:
        columns.append("cost, BN re-estimated")
    if skip:
        columns += ["acc. skip removed", "skip cost (points)"]
    section.table(
        f"Single-block lesions (clean accuracy {clean.accuracy:.2%} on {clean.count} test {ctx.task.prediction}s)",
        columns,
        rows,
    )
    costs = [_cost(clean, s) for s in single]
    section.block_column("lesion cost (points)", {b.name: c for b, c in zip(blocks, costs)})
    if skip:
        section.block_column("skip removal cost (points)", {b.name: _cost(clean, s) for b, s in zip(blocks, skip)})
    plain_costs = [c for c, b in zip(costs, blocks) if not b.downsamples] or costs
    m["median_lesion_cost_points"] = statistics.median(plain_costs)
    m["max_lesion_cost_points"] = max(costs)
    if recal:
        regular_recal = [_cost(clean, r) for r, b in zip(recal, blocks) if not b.downsamples] or [
            _cost(clean, r) for r in recal
        ]
        m["median_lesion_cost_bn_points"] = statistics.median(regular_recal)
    if skip:
        m["median_skip_removal_cost_points"] = statistics.median(_cost(clean, s) for s in skip)
    _by_kind(section, blocks, costs, [_cost(clean, s) for s in skip])

    k_curve = []
    for k, ls in k_lesions.items():
        accs = [by_lesion[lesion].accuracy for lesion in ls]
        mean = statistics.fmean(accs)
        sd = statistics.pstdev(accs)
        k_curve.append((k, mean, sd, min(accs), max(accs)))
        m[f"k/{k}/mean_accuracy"], m[f"k/{k}/std_accuracy"] = mean, sd
        ctx.log_scalar("k_mean_accuracy", mean, k)
    if k_curve:
        section.table(
            "Bypassing k random blocks together",
            ["k", "mean acc.", "std", "min", "max"],
            [list(r) for r in k_curve],
            caption=f"{opts['subsets']} random subsets per k, seed {ctx.seed}.",
        )

    if pair_lesions:
        _pairwise(section, blocks, regular, clean, costs, by_lesion, opts)
    if groups:
        _layer_study(section, ctx, model, groups, clean, by_lesion, opts)
    plain = _plain_comparison(ctx, blocks, opts)
    if plain is not None:
        m.update(plain["metrics"])
        section.table(
            f"Plain twin ({ctx.label('twin')}): each layer pair replaced by the identity",
            ["layer pair", "acc. removed", "cost (points)"] + (["cost, BN re-estimated"] if plain["recal"] else []),
            plain["rows"],
            caption=f"Clean accuracy of the twin: {plain['clean'].accuracy:.2%}.",
        )
    _findings(section, ctx, blocks, clean, costs, skip, k_curve, plain, opts)
    _figures(section, blocks, clean, single, skip, k_curve, plain)
    return section


def _layer_study(section, ctx, model, groups, clean, by_lesion, opts) -> None:
    """Lad et al. (2024): each whole layer deleted (all its sites bypassed) and each adjacent pair swapped."""
    deleted = [_cost(clean, by_lesion[Lesion("bypass", idx)]) for _, idx in groups]
    names = [layer for layer, _ in groups]
    pairs = list(zip(names, names[1:]))
    batches = ctx.progress(ctx.test_batches(opts["samples"]), desc="adjacent layers swapped")
    swapped = swap_sweep(model, batches, pairs)
    swaps = {i: _cost(clean, st) for i, st in enumerate(swapped) if st is not None}
    m = section.metrics
    rows = []
    for i, (layer, idx) in enumerate(groups):
        m[f"layer_delete/{layer}/cost_points"] = deleted[i]
        row = [layer, len(idx), by_lesion[Lesion("bypass", idx)].accuracy, deleted[i]]
        if i in swaps:
            m[f"layer_swap/{layer}/cost_points"] = swaps[i]
        row += [names[i + 1] if i in swaps else "", swaps.get(i)]
        rows.append(row)
        ctx.log_scalar("layer_delete_cost", deleted[i], i)
    section.table(
        "Whole layers deleted, adjacent layers swapped (Lad et al. 2024)",
        ["layer", "sites", "acc. deleted", "delete cost (points)", "swapped with", "swap cost (points)"],
        rows,
        caption=f"Clean accuracy {clean.accuracy:.2%}; a swap runs each layer's computation in the other's place "
        "(only where their shapes allow).",
    )
    m["median_layer_delete_cost_points"] = statistics.median(deleted)
    if swaps:
        m["median_layer_swap_cost_points"] = statistics.median(swaps.values())
    section.finding(_layer_finding(names, deleted, pairs, swaps))


def _layer_finding(names: list[str], deleted: list[float], pairs: list, swaps: dict[int, float]) -> str:
    text = f"Deleting a whole layer costs {deleted[0]:.1f} points for the first ({names[0]}), "
    text += f"{deleted[-1]:.1f} for the last"
    middle = deleted[1:-1]
    if middle:
        mid = statistics.median(middle)
        text += f" and a median {mid:.1f} for the {len(middle)} in between"
        first, last = deleted[0] > mid, deleted[-1] > mid
        if first and last:
            text += ": the first and last layers are the most sensitive, as Lad et al. (2024) find."
        elif first or last:
            text += f": only the {'first' if first else 'last'} is more sensitive than the middle ones, "
            text += "where Lad et al. (2024) find both ends."
        else:
            text += ": unlike Lad et al. (2024), neither end is more sensitive than the middle."
    else:
        text += " (no middle layers to compare with)."
    if swaps:
        worst = max(swaps, key=swaps.__getitem__)
        text += (
            f" Swapping adjacent layers costs a median {statistics.median(swaps.values()):.1f} points (most: "
            f"{pairs[worst][0]} ↔ {pairs[worst][1]}, {swaps[worst]:.1f}) against a median "
            f"{statistics.median(deleted):.1f} for deleting one."
        )
    return text


def _plain_comparison(ctx, blocks, opts) -> dict[str, Any] | None:
    if ctx.twin is None:
        return None
    twin = ctx.twin
    with eval_mode(twin):
        probe = next(ctx.test_batches(2))[0]
        pairs = _plain_layer_pairs(twin, [b.name for b in blocks], probe)
        if not pairs:
            return None
        lesions = [Lesion("identity", (i,)) for i in range(len(pairs))]
        mods = [mod for _, mod in pairs]
        clean, stats = _sweep(ctx, twin, mods, lesions, opts, "plain twin sweep", fast=opts["fast"])
        recal = None
        if opts["bn_recalibrate"] and _has_batchnorm(twin):
            recal = _recalibrated_sweep(ctx, twin, mods, lesions, opts)
    rows, metrics = [], {"plain_clean_accuracy": clean.accuracy}
    for i, ((name, _), s) in enumerate(zip(pairs, stats)):
        rows.append([name, s.accuracy, _cost(clean, s)] + ([_cost(clean, recal[i])] if recal else []))
        metrics[f"plain/{name}/accuracy"] = s.accuracy
    metrics["plain_median_cost_points"] = statistics.median(r[2] for r in rows)
    if recal:
        metrics["plain_median_cost_bn_points"] = statistics.median(r[3] for r in rows)
    return {
        "rows": rows,
        "metrics": metrics,
        "clean": clean,
        "names": [n for n, _ in pairs],
        "accuracy": {n: s.accuracy for (n, _), s in zip(pairs, stats)},
        "recal": recal is not None,
    }


def _pairwise(section, blocks, regular, clean, costs, by_lesion, opts) -> None:
    """Pairwise lesions: if blocks act like members of an ensemble, removing two costs the sum of the two."""
    import numpy as np

    n = len(regular)
    pair = np.full((n, n), np.nan)
    inter = np.full((n, n), np.nan)
    for a, i in enumerate(regular):
        for b in range(a + 1, n):
            j = regular[b]
            cost = _cost(clean, by_lesion[Lesion("bypass", (i, j))])
            pair[a, b] = pair[b, a] = cost
            inter[a, b] = inter[b, a] = cost - costs[i] - costs[j]
    upper = np.triu_indices(n, 1)
    pair_costs, interactions = pair[upper], inter[upper]
    m = section.metrics
    m.update(
        {
            "pairs": len(pair_costs),
            "pair_median_cost_points": float(np.median(pair_costs)),
            "pair_median_sum_of_singles_points": float(np.median(pair_costs - interactions)),
            "pair_median_interaction_points": float(np.median(interactions)),
            "pair_median_abs_interaction_points": float(np.median(np.abs(interactions))),
        }
    )
    order = np.argsort(-np.abs(interactions))[:8]
    names = [blocks[i].name for i in regular]
    section.table(
        "Pairwise lesions: the most interacting pairs",
        ["block", "block", "pair cost (points)", "sum of single costs", "interaction"],
        [
            [
                names[upper[0][t]],
                names[upper[1][t]],
                float(pair_costs[t]),
                float(pair_costs[t] - interactions[t]),
                float(interactions[t]),
            ]
            for t in order
        ],
        caption=f"{len(pair_costs)} pairs of non-downsampling blocks; interaction = pair cost − the two "
        "single-block costs (0: the two blocks act independently).",
    )
    singles = m["pair_median_sum_of_singles_points"]
    threshold = max(opts["independent_points"], 0.25 * abs(singles))
    independent = m["pair_median_abs_interaction_points"] <= threshold
    direction = "more" if m["pair_median_interaction_points"] > 0 else "less"
    summary = (
        f"Removing two blocks costs a median {m['pair_median_cost_points']:.1f} points against "
        f"{singles:.1f} for the two removals' single costs added up (median |interaction| "
        f"{m['pair_median_abs_interaction_points']:.1f} points over {len(pair_costs)} pairs)"
    )
    if float(np.max(np.abs(pair_costs))) < opts["independent_points"]:
        section.finding(
            summary + ": no pair costs measurable accuracy here, so the test says nothing about interactions.", "info"
        )
    else:
        section.finding(
            summary
            + (
                ": the blocks act nearly independently, as members of an ensemble would."
                if independent
                else f": the blocks interact — removing two typically costs {direction} than the sum of removing each."
            ),
            "good" if independent else "info",
        )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.28 * n + 2.5), max(3.8, 0.28 * n + 1.8)))
    vmax = max(float(np.nanmax(np.abs(inter))), 1e-9)
    im = ax.imshow(inter, cmap="coolwarm", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=90, fontsize=6)
    ax.set_yticks(range(n), names, fontsize=6)
    ax.set(title="Pair cost − sum of single costs (points)")
    fig.colorbar(im, ax=ax)
    section.figure(
        fig,
        "Pairwise lesion interaction",
        "Red: removing the two blocks together costs more than "
        "removing each alone, added up; blue: less; white: they act independently (Veit et al.'s "
        "ensemble view predicts white).",
    )


def _by_kind(section, blocks, costs: list[float], skip_costs: list[float]) -> None:
    """Medians per kind of residual site (a transformer's attention and MLP sites), when there are several."""
    kinds = sorted({b.kind for b in blocks})
    if len(kinds) < 2:
        return
    m, parts = section.metrics, []
    for kind in kinds:
        mine = [i for i, b in enumerate(blocks) if b.kind == kind]
        m[f"median_lesion_cost_points/{kind}"] = statistics.median(costs[i] for i in mine)
        text = f"{kind} ({len(mine)}): bypassing costs a median {m[f'median_lesion_cost_points/{kind}']:.1f} points"
        if skip_costs:
            m[f"median_skip_removal_cost_points/{kind}"] = statistics.median(skip_costs[i] for i in mine)
            text += f", removing the skip {m[f'median_skip_removal_cost_points/{kind}']:.1f}"
        parts.append(text)
    text = "By kind of residual site: " + "; ".join(parts) + "."
    if {"attention", "mlp"} <= set(kinds) and skip_costs:
        a, f = (m[f"median_skip_removal_cost_points/{k}"] for k in ("attention", "mlp"))
        text += (
            " Removing an attention skip costs more than removing an MLP skip, as Ji et al. (2025) find."
            if a > f
            else " Removing an attention skip does not cost more than removing an MLP skip here, unlike "
            "Ji et al. (2025)."
        )
    section.finding(text)


def _findings(section, ctx, blocks, clean, costs, skip, k_curve, plain, opts) -> None:
    m = section.metrics
    critical = [(b, c) for b, c in zip(blocks, costs) if c >= opts["critical_points"]]
    if critical:
        listed = ", ".join(
            f"{b.name} ({c:.1f} points{', downsampling' if b.downsamples else ''})"
            for b, c in sorted(critical, key=lambda t: -t[1])[:8]
        )
        more = f" and {len(critical) - 8} more" if len(critical) > 8 else ""
        section.finding(
            f"Critical blocks (bypassing one costs ≥ {opts['critical_points']:g} points): {listed}{more}.", "warning"
        )
    else:
        section.finding(
            f"No single block is critical: bypassing any one of the {len(blocks)} blocks costs less "
            f"than {opts['critical_points']:g} accuracy points (worst: {max(costs):.1f}).",
            "good",
        )
    if any(not b.downsamples for b in blocks):
        med = m["median_lesion_cost_points"]
        text = f"Bypassing one non-downsampling block costs a median {med:.1f} points (from {clean.accuracy:.1%})"
        if "median_lesion_cost_bn_points" in m:
            text += (
                f", and {m['median_lesion_cost_bn_points']:.1f} points once BatchNorm statistics are "
                "re-estimated with the block removed"
            )
        small = min(med, m.get("median_lesion_cost_bn_points", med)) < 2.0
        text += (
            ": most blocks are dispensable one at a time, as the ensemble-of-paths view predicts."
            if small
            else ": here single blocks still matter; deeper or longer-trained ResNets usually "
            "depend less on any one block."
        )
        section.finding(text, "good" if small else "info")
    if skip:
        section.finding(
            f"Removing a skip connection instead (keeping only the branch) costs a median "
            f"{m['median_skip_removal_cost_points']:.1f} points: compare with the bypass cost above to "
            "see which path carries the signal.",
            "info",
        )
    if len(k_curve) >= 2:
        means = [r[1] for r in k_curve]
        drops = [(clean.accuracy if i == 0 else means[i - 1]) - means[i] for i in range(len(means))]
        total = clean.accuracy - means[-1]
        biggest = max(range(len(drops)), key=drops.__getitem__)
        cliff = total > 0.05 and drops[biggest] > 0.5 * total and len(drops) > 2
        shape = f"falls off a cliff at k={k_curve[biggest][0]}" if cliff else "degrades smoothly"
        section.finding(
            f"Bypassing k random blocks together, accuracy {shape}: "
            + ", ".join(f"k={k}: {mu:.1%}" for k, mu, *_ in k_curve)
            + ".",
            "warning" if cliff else "info",
        )
    if plain is not None and any(not b.downsamples for b in blocks):
        key = (
            "median_lesion_cost_bn_points"
            if plain["recal"] and "median_lesion_cost_bn_points" in m
            else "median_lesion_cost_points"
        )
        pkey = "plain_median_cost_bn_points" if key.endswith("bn_points") else "plain_median_cost_points"
        how = " (BatchNorm re-estimated)" if key.endswith("bn_points") else ""
        res_med, plain_med = m[key], plain["metrics"][pkey]
        chance = 1.0 / max(2, ctx.data.num_classes)
        if ctx.trained is False:
            section.finding(
                f"Residual vs plain: neither {ctx.model_name} ({clean.accuracy:.1%}) nor its plain twin "
                f"{ctx.label('twin')} ({plain['clean'].accuracy:.1%}, chance {chance:.0%}) was trained (no epochs, no "
                "checkpoint): their accuracies say nothing about degradation, and lesion costs measured at "
                f"initialisation (median {res_med:.1f} vs {plain_med:.1f} points) say little about what trained "
                "blocks do.",
                "warning",
            )
            return
        if plain["clean"].accuracy < 2 * chance:
            section.finding(
                f"Residual vs plain: the plain twin {ctx.label('twin')} barely learned ({plain['clean'].accuracy:.1%} "
                f"test accuracy, chance {chance:.0%}) while {ctx.model_name} reached {clean.accuracy:.1%}: the "
                "degradation problem itself. With so little learned, removing its layers has little left to "
                f"destroy (median cost {plain_med:.1f} points), so the lesion comparison says little here.",
                "warning",
            )
            return
        section.finding(
            f"Residual vs plain{how}: bypassing one block of {ctx.model_name} costs a median {res_med:.1f} points, "
            f"removing the same layer pair from its plain twin {ctx.label('twin')} costs a median "
            f"{plain_med:.1f} points "
            f"(intact accuracies {clean.accuracy:.1%} and {plain['clean'].accuracy:.1%}).",
            "good" if plain_med > res_med else "info",
        )


def _figures(section, blocks, clean, single, skip, k_curve, plain) -> None:
    plt = pyplot()
    import numpy as np

    names = [b.name for b in blocks]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 3.6))
    width = 0.4 if skip else 0.7
    ax.bar(
        x - (width / 2 if skip else 0),
        [100 * (clean.accuracy - s.accuracy) for s in single],
        width,
        label="block bypassed",
        color="#2c5aa0",
    )
    if skip:
        ax.bar(
            x + width / 2,
            [100 * (clean.accuracy - s.accuracy) for s in skip],
            width,
            label="skip removed",
            color="#c0504d",
        )
    for i, b in enumerate(blocks):
        if b.downsamples:
            ax.axvspan(i - 0.5, i + 0.5, color="#999", alpha=0.15, lw=0)
    ax.set_xticks(x, names, rotation=70, fontsize=7)
    ax.set_ylabel("accuracy cost (points)")
    ax.set_title("Cost of each single lesion (grey: downsampling blocks)")
    ax.legend()
    section.figure(
        fig,
        "Single-block lesions",
        "Accuracy lost when one block is bypassed (blue) or loses its skip (red), relative to the intact network.",
    )
    if k_curve:
        ks = [r[0] for r in k_curve]
        mean = np.array([r[1] for r in k_curve])
        sd = np.array([r[2] for r in k_curve])
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([0] + ks, [clean.accuracy] + list(mean), marker="o", color="#2c5aa0", label="mean")
        ax.fill_between(ks, mean - sd, mean + sd, alpha=0.25, color="#2c5aa0", label="± 1 std")
        ax.fill_between(
            ks, [r[3] for r in k_curve], [r[4] for r in k_curve], alpha=0.1, color="#2c5aa0", label="min–max"
        )
        ax.set(
            xlabel="blocks bypassed together (k)",
            ylabel="test accuracy",
            ylim=(0, 1.02),
            title="Accuracy vs number of bypassed blocks",
        )
        ax.legend()
        section.figure(fig, "Bypassing k random blocks", "Mean, spread and range over random subsets of k blocks.")
    if plain is not None:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 3.6))
        ax.plot(x, [s.accuracy for s in single], marker="o", label="residual: block bypassed")
        px = [names.index(n) for n in plain["names"]]
        ax.plot(
            px,
            [plain["accuracy"][n] for n in plain["names"]],
            marker="s",
            ls="--",
            label="plain twin: layer pair removed",
        )
        ax.axhline(clean.accuracy, color="#2c5aa0", lw=0.8, ls=":")
        ax.axhline(plain["clean"].accuracy, color="#c0504d", lw=0.8, ls=":")
        ax.set_xticks(x, names, rotation=70, fontsize=7)
        ax.set(ylabel="test accuracy", ylim=(0, 1.02), title="Residual vs plain: one lesion at a time")
        ax.legend()
        section.figure(
            fig,
            "Residual vs plain",
            "Test accuracy after removing one block (residual) or the same "
            "layer pair (plain twin); dotted lines: intact accuracies.",
        )
