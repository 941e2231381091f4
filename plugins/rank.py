"""Token and representation rank along the residual stream: Dong et al. 2021's relative residual (rank
collapse), the effective rank and the mean cosine between tokens, for the model, its plain twin and (for a
transformer) the pure-attention path, at initialisation and trained."""

from __future__ import annotations

import math
from contextlib import ExitStack

import numpy as np
import torch
from torch import nn

from resinspect import Section, block_module, bypass, drop_skip, eval_mode, hookimpl, no_blocks_reason, pyplot
from resinspect_plugins.lens import points_of, stream_hooks

NAME = "rank"

EXPLANATION = """\
Dong, Cordonnier & Loukas (2021) show that self-attention without skip connections loses rank doubly \
exponentially with depth: every token's representation converges to the same vector. They measure it by the \
relative residual ‖X − 1x̄ᵀ‖ / ‖X‖ of the token matrix X (tokens × features), in the composite norm \
‖M‖ = √(‖M‖₁‖M‖∞) of their analysis; x̄ here is the mean token (the best such vector in the Frobenius norm, \
also reported). A residual near 0 means the tokens have collapsed to one. Skip connections (and, less so, MLPs) \
prevent it. For convolutional networks the same is measured over spatial positions (positions × channels).

Two more views of the same thing: the effective rank of X (Roy & Vetterli 2007: the exponential of the entropy \
of its normalised singular values; 1 for a collapsed matrix) and the mean cosine similarity between distinct \
tokens (Noci et al. 2022: 1 when they are all parallel). Each is averaged over images, at the stream entering the \
first block and after every block or residual site, for the model, its plain twin and — for a network with \
attention sites — the pure-attention path (every attention skip removed and every MLP site bypassed), at \
initialisation and after training."""


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 64, "test images measured (0: the whole test set)", bounds="[0, 100_000_000]")
    options.add(
        "max_tokens",
        int,
        1024,
        "tokens (or positions) kept per image; more are subsampled with a fixed stride",
        bounds="[2, 1_000_000]",
    )
    options.add("at_init", bool, True, "also measure at initialisation (when the run trained the networks)")


def token_matrix(s: torch.Tensor) -> torch.Tensor:
    """A stream batch as (B, tokens, features): token streams (B, N, D) as they are, feature maps (B, C, H, W)
    as positions × channels."""
    if s.dim() == 4:
        return s.flatten(2).transpose(1, 2)
    if s.dim() == 3:
        return s
    raise ValueError(f"no tokens in a stream of shape {tuple(s.shape)}")


def composite_norm(m: torch.Tensor) -> torch.Tensor:
    """√(‖M‖₁ ‖M‖∞) per matrix of a (B, N, D) batch: ‖M‖₁ the largest column sum of |M|, ‖M‖∞ the largest row sum."""
    a = m.abs()
    return torch.sqrt(a.sum(1).amax(-1) * a.sum(2).amax(-1))


def measures(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image of a (B, N, D) batch (float64): relative residual (composite and Frobenius), effective rank,
    mean cosine between distinct tokens."""
    x = x.double()
    res = x - x.mean(1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    sv = torch.linalg.svdvals(x)
    p = sv / sv.sum(-1, keepdim=True).clamp_min(tiny)
    entropy = -(p * torch.log(p.clamp_min(tiny))).sum(-1)
    n = x.shape[1]
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(tiny)
    pair_sum = unit.sum(1).pow(2).sum(-1) - unit.pow(2).sum((1, 2))
    return {
        "residual": composite_norm(res) / composite_norm(x).clamp_min(tiny),
        "residual_fro": res.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(tiny),
        "effective_rank": torch.exp(entropy),
        "cosine": pair_sum / max(n * (n - 1), 1),
    }


def measure_network(ctx, net: nn.Module, points, images: int, max_tokens: int) -> dict[str, dict[str, float]]:
    """Mean of every measure at every point over ``images`` test images (sums all-reduced across ranks)."""
    sums: dict[str, float] = {}
    at_once = max(1, int(AT_ONCE_MACS // max(1, ctx.multiply_adds())))  # every point's stream is held at once
    with stream_hooks(points) as take, eval_mode(net), torch.no_grad():
        for x_all, _ in ctx.shard(ctx.test_batches(images)):
            for x in x_all.split(at_once):
                _add_measures(sums, points, net, x, take, max_tokens)
    return _means(ctx, sums, points)


# the images whose whole stream is held at once: about this many multiply-adds of forward (resnet50 at 224 px:
# 12 images, some 270 MB of streams; resnet20 on digits: every batch whole)
AT_ONCE_MACS = 5e10


def _add_measures(sums: dict[str, float], points, net: nn.Module, x: torch.Tensor, take, max_tokens: int) -> None:
    """Add one chunk's sums of every measure at every point to ``sums``."""
    net(x)
    seen = take()
    for name, _, _ in points:
        if name not in seen or seen[name].dim() not in (3, 4):
            continue
        t = token_matrix(seen[name])
        if t.shape[1] > max_tokens:
            sums[f"{name}|positions"] = float(t.shape[1])
            t = t[:, :: math.ceil(t.shape[1] / max_tokens)]
        for key, v in measures(t).items():
            sums[f"{name}|{key}"] = sums.get(f"{name}|{key}", 0.0) + float(v.sum())
        sums[f"{name}|n"] = sums.get(f"{name}|n", 0.0) + len(t)
        sums[f"{name}|tokens"] = float(t.shape[1])


def _means(ctx, sums: dict[str, float], points) -> dict[str, dict[str, float]]:
    sums = ctx.all_reduce(sums)
    out: dict[str, dict[str, float]] = {}
    for name, _, _ in points:
        n = sums.get(f"{name}|n", 0.0)
        if n:
            out[name] = {k: sums[f"{name}|{k}"] / n for k in ("residual", "residual_fro", "effective_rank", "cosine")}
            out[name]["tokens"] = sums[f"{name}|tokens"] / max(ctx.world_size, 1)
            if f"{name}|positions" in sums:
                out[name]["positions"] = sums[f"{name}|positions"] / max(ctx.world_size, 1)
    return out


@hookimpl
def resinspect_estimate(ctx) -> float:
    """One forward pass of the images through each network in each state, and again for the pure-attention
    path of a model with attention sites; the singular values of every point's token matrix cost about
    three and a half passes more (measured on resnet50 at 224 px: 32 s where the passes alone take 7)."""
    opts = ctx.options()
    blocks = ctx.blocks("model")
    if not blocks:
        return 0.0
    states = 2 if opts["at_init"] and ctx.trained_in_run else 1
    paths = 2 if any(b.kind == "attention" for b in blocks) else 1
    images = ctx.test_images(opts["samples"])
    return 4.5 * ctx.multiply_adds() * images * len(ctx.networks()) * states * paths


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options()
    s = Section(
        title="Rank: token and representation collapse along the stream", explanation=EXPLANATION, docs="explainer-rank"
    )
    s.key_metrics = ["trained/model/residual_last", "trained/twin/residual_last"]
    blocks = ctx.blocks("model")
    if not blocks:
        return s.skip(f"{ctx.model_name} has no residual blocks ({no_blocks_reason(blocks)}): no stream to follow")
    images = ctx.test_images(opts["samples"])
    states = {"trained": {role: net for role, net in ctx.networks()}}
    if opts["at_init"] and ctx.trained_in_run:
        states["init"] = {role: ctx.initial_network(role) for role, _ in ctx.networks()}
    elif opts["at_init"] and not ctx.trained_in_run:
        s.finding(
            "Measured once: the model was loaded trained and this run trained nothing, so there are no initial "
            "weights to compare with."
            if ctx.trained
            else "Measured once: nothing was trained in this run, so the analysed weights are the initial ones."
        )
    attention = [b for b in blocks if b.kind == "attention"]
    others = [b for b in blocks if b.kind != "attention"]
    results: dict[str, dict[str, dict]] = {}
    for state, nets in states.items():
        results[state] = {}
        for role, net in nets.items():
            if net is None:
                continue
            # the modules are found by name in the network measured (the initial copy is another object)
            points = _rebind(ctx, net, points_of(ctx, role), role)
            if points:
                results[state][role] = measure_network(ctx, net, points, images, opts["max_tokens"])
        if attention:
            net = states[state]["model"]
            mine = _blocks_of(net, ctx, state)
            with ExitStack() as stack:
                stack.enter_context(drop_skip(net, [mine[b.name] for b in attention]))
                if others:
                    stack.enter_context(bypass(net, [mine[b.name] for b in others]))
                points = [("input", mine[blocks[0].name].module, "input")] + [
                    (b.name, mine[b.name].module, "output") for b in attention
                ]
                results[state]["pure_attention"] = measure_network(ctx, net, points, images, opts["max_tokens"])
    _report(s, ctx, results, blocks)
    return s


def _blocks_of(net: nn.Module, ctx, state: str) -> dict:
    from resinspect import residual_blocks

    found = ctx.blocks("model") if state == "trained" else residual_blocks(net)
    return {b.name: b for b in found}


def _rebind(ctx, net, points, role):
    if net is dict(ctx.networks())[role]:
        return points
    out = []
    for name, _, where in points:
        target = ctx.blocks("model")[0].name if name == "input" else name
        try:
            out.append((name, block_module(net, target), where))
        except AttributeError:
            continue
    return out


def _report(s: Section, ctx, results: dict, blocks) -> None:
    label = {"model": ctx.model_name, "twin": ctx.label("twin"), "pure_attention": "pure-attention path"}
    for state, variants in results.items():
        for variant, per_point in variants.items():
            names = list(per_point)
            if not names:
                continue
            last = per_point[names[-1]]
            s.metrics[f"{state}/{variant}/residual_last"] = last["residual"]
            s.metrics[f"{state}/{variant}/effective_rank_last"] = last["effective_rank"]
            s.metrics[f"{state}/{variant}/cosine_last"] = last["cosine"]
            for name, m in per_point.items():
                for k in ("residual", "residual_fro", "effective_rank", "cosine"):
                    s.metric(f"{state}/{variant}/{k}/{name}", m[k], tensorboard=False)
            if variant in ("model", "twin"):
                for i, name in enumerate(names):
                    ctx.log_scalars(
                        {
                            f"{state}/residual": per_point[name]["residual"],
                            f"{state}/effective_rank": per_point[name]["effective_rank"],
                        },
                        i,
                        role=variant,
                    )
            s.table(
                f"{label[variant]}, {'at initialisation' if state == 'init' else 'as analysed'}",
                [
                    "point",
                    "tokens",
                    "relative residual (ℓ1·ℓ∞)",
                    "relative residual (Frobenius)",
                    "effective rank",
                    "mean token cosine",
                ],
                [
                    [n, int(m["tokens"]), m["residual"], m["residual_fro"], m["effective_rank"], m["cosine"]]
                    for n, m in per_point.items()
                ],
                fold=True,
            )
    trained = results.get("trained", {}).get("model", {})
    if trained:
        s.block_column(
            "relative residual (rank)", {k: v["residual"] for k, v in trained.items() if k != "input"}, "smaller"
        )
    _findings(s, ctx, results, label)
    cut = {n: m for variants in results.values() for p in variants.values() for n, m in p.items() if "positions" in m}
    if cut:
        n, m = next(iter(cut.items()))
        s.finding(
            f"Subsampled: at {len(cut)} point(s) the stream has more tokens or positions than -o rank.max_tokens "
            f"allows, and every k-th was kept (e.g. {n}: {int(m['tokens'])} of {int(m['positions'])})."
        )
    _figure(s, results, label)


def _findings(s: Section, ctx, results: dict, label: dict) -> None:
    texts, verdict = [], None
    for state in ("init", "trained"):
        got = results.get(state, {})
        if not got.get("model"):
            continue
        when = "at initialisation" if state == "init" else ("trained" if ctx.trained else "as analysed")
        last = {v: list(p.values())[-1]["residual"] for v, p in got.items() if p}
        first = {v: list(p.values())[0]["residual"] for v, p in got.items() if p}
        texts.append(f"{when}: " + "; ".join(f"{label[v]} {first[v]:.3f} → {last[v]:.3f}" for v in last))
        if "pure_attention" in last and verdict is None:
            collapsed = last["pure_attention"] < 0.5 * first["pure_attention"]
            kept = last["model"] >= 0.5 * first["model"]
            verdict = (
                f" {when.capitalize()}, the pure-attention path collapses towards rank one and the skips prevent it, "
                "as Dong et al. (2021) predict."
                if collapsed and kept
                else f" Dong et al.'s rank collapse of pure attention does not show {when} "
                f"(pure attention {'collapses' if collapsed else 'keeps its rank'}, the model "
                f"{'keeps' if kept else 'loses'} it)."
            )
    if not texts:
        return
    s.finding(
        "Relative residual from the first to the last point of the stream, " + "; ".join(texts) + "." + (verdict or "")
    )
    state = "init" if "init" in results else "trained"
    got = results[state]
    if got.get("twin") and got.get("model"):
        when = "at initialisation" if state == "init" else "as analysed"
        m, t = list(got["model"].values())[-1], list(got["twin"].values())[-1]
        s.finding(
            f"Effective rank of the last stream {when}: {m['effective_rank']:.1f} for {label['model']}, "
            f"{t['effective_rank']:.1f} for {label['twin']}; mean token cosine {m['cosine']:.2f} vs {t['cosine']:.2f}."
        )


def _figure(s: Section, results: dict, label: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for state, variants in results.items():
        for i, (variant, per_point) in enumerate(variants.items()):
            if not per_point:
                continue
            depth = np.linspace(0, 1, len(per_point)) if len(per_point) > 1 else np.zeros(1)
            style = "--" if state == "init" else "-"
            name = f"{label[variant]} ({'init' if state == 'init' else 'analysed'})"
            axes[0].plot(
                depth, [m["residual"] for m in per_point.values()], style, color=f"C{i}", marker=".", label=name
            )
            axes[1].plot(
                depth, [m["effective_rank"] for m in per_point.values()], style, color=f"C{i}", marker=".", label=name
            )
    axes[0].set(xlabel="depth (fraction of the stream points)", ylabel="relative residual (ℓ1·ℓ∞)", yscale="log")
    axes[1].set(xlabel="depth (fraction of the stream points)", ylabel="effective rank", yscale="log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    s.figure(fig, "Rank along the stream", "solid: as analysed; dashed: at initialisation")
