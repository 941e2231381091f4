"""Activation statistics over the test set: response strength per layer (He et al. 2016, Fig. 7), how much
each residual block perturbs its input, signal propagation of the residual stream (Brock et al. 2021) and
dead ReLU units. Every statistic is accumulated as per-batch sums."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from resinspect import Section, eval_mode, hookimpl, no_blocks_reason, on_forward, pyplot, residual_blocks

NAME = "activations"

EXPLANATION = """\
Response strength (He et al. 2016, Fig. 7): the standard deviation of each 3×3 convolution's output after its \
BatchNorm and before the addition and ReLU, over the test set. In residual networks these responses are \
generally smaller than in the plain twin: each branch only nudges the signal.

For every residual block y = post(F(x) + S(x)): ||F(x)|| / ||S(x)|| (S(x) = x for identity shortcuts) and the \
cosine between F(x) and S(x), per image and averaged over the test set. A ratio near 0 means the block is \
close to the identity; a cosine near −1 means the branch mostly cancels its input.

Signal propagation (Brock, De & Smith 2021): at each block's output, the mean over channels of the squared \
channel mean, and the average channel variance, at initialisation and after training. In a well-behaved \
residual network the variance grows roughly linearly with depth and the squared mean stays small.

Dead ReLU units: channels of a ReLU's output that are zero for every test image at every position (a ReLU \
module used twice in a block is counted per use, #0 and #1)."""


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 0, "test images to use (0: the whole test set)", bounds="[0, 100_000_000]")
    options.add(
        "identity_threshold",
        float,
        0.1,
        "blocks with ||F(x)||/||x|| below this count as close to the identity",
        bounds="(0, 1000]",
    )
    options.add(
        "dead_threshold", float, 0.5, "layers with more than this fraction of dead units are reported", bounds="(0, 1]"
    )


@dataclass
class Moments:
    """count, sum and sum of squares of every element (float64)."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()  # summed in float64 without a float64 copy of the whole map
        self.count += t.numel()
        self.total += t.sum(dtype=torch.float64).item()
        self.squares += (t * t).sum(dtype=torch.float64).item()

    @property
    def std(self) -> float:
        if self.count < 2:
            return float("nan")
        mean = self.total / self.count
        return float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0) * self.count / (self.count - 1)))


@dataclass
class ChannelMoments:
    """Per-channel count, sum and sum of squares over (N, H, W)."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        dims = [d for d in range(t.dim()) if d != 1]
        s, q = t.sum(dims, dtype=torch.float64), (t * t).sum(dims, dtype=torch.float64)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += t.numel() // t.shape[1]

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.total is None or self.squares is None:
            raise ValueError("no activations were added")
        return self.total, self.squares

    def mean_sq_channel_mean(self) -> float:
        total, _ = self._sums()
        mean = total / self.count
        return (mean * mean).mean().item()

    def avg_channel_var(self) -> float:
        total, squares = self._sums()
        mean = total / self.count
        return (squares / self.count - mean * mean).clamp_min(0).mean().item()


@dataclass
class Stats:
    responses: dict[str, Moments] = field(default_factory=lambda: defaultdict(Moments))
    ratio_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    cos_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    images: int = 0
    stream: dict[str, ChannelMoments] = field(default_factory=lambda: defaultdict(ChannelMoments))
    relu_max: dict[str, torch.Tensor] = field(default_factory=dict)


def response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm2d modules that directly follow a 3×3 convolution in their parent (registration order)."""
    found: list[tuple[str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (_, prev), (name, mod) in zip(children, children[1:]):
            if isinstance(mod, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d) and prev.kernel_size == (3, 3):
                found.append((f"{parent_name}.{name}" if parent_name else name, mod))
    return found


@torch.no_grad()
def collect(model: nn.Module, batches, with_blocks: bool = True) -> Stats:
    """Run ``batches`` through ``model`` (eval mode) and accumulate every statistic as sums."""
    stats = Stats()
    blocks = residual_blocks(model) if with_blocks else []
    relu_calls: dict[str, int] = defaultdict(int)
    # the block hook recomputes F(x) and S(x); layer hooks must not count those extra calls
    recomputing = [False]

    def response_hook(n, m, i, o):
        if not recomputing[0]:
            stats.responses[n].add(o)

    def block_hook(name, m, inputs, output):
        b = by_name[name]
        x = inputs[0]
        recomputing[0] = True
        try:
            f, sc = b.branch(x).flatten(1).double(), b.shortcut(x).flatten(1).double()
        finally:
            recomputing[0] = False
        fn, sn = f.norm(dim=1), sc.norm(dim=1)
        stats.ratio_sum[b.name] += (fn / sn.clamp_min(1e-12)).sum().item()
        stats.cos_sum[b.name] += (torch.nn.functional.cosine_similarity(f, sc, dim=1, eps=1e-12)).sum().item()
        stats.stream[b.name].add(output)

    def relu_hook(n, m, i, o):
        if recomputing[0]:
            return
        key = f"{n}#{relu_calls[n]}"
        relu_calls[n] += 1
        if o.dim() < 2:
            return
        dims = [d for d in range(o.dim()) if d != 1]
        peak = o.detach().amax(dim=dims)
        stats.relu_max[key] = peak if key not in stats.relu_max else torch.maximum(stats.relu_max[key], peak)

    by_name = {b.name: b for b in blocks}
    relus = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ReLU)]
    with (
        on_forward(response_layers(model), response_hook),
        on_forward(blocks, block_hook),
        on_forward(relus, relu_hook),
    ):
        for x, _ in batches:
            relu_calls.clear()
            model(x)
            stats.images += len(x)
    return stats


def _collect_eval(ctx, model: nn.Module, limit: int) -> Stats:
    with eval_mode(model):
        stats = collect(model, ctx.shard(ctx.progress(ctx.test_batches(limit), desc="activation statistics (batches)")))
    return _reduced(ctx, stats)


def _reduced(ctx, stats: Stats) -> Stats:
    """Under torchrun: every rank's sums added up, the ReLU peaks maximised (one process: as it is)."""
    if ctx.world_size == 1:
        return stats
    peaks = ctx.all_reduce(stats.relu_max, "max")
    stats.relu_max = {}
    stats = ctx.all_reduce(stats)
    stats.relu_max = peaks
    return stats


def _at_init(ctx, role: str, limit: int) -> Stats | None:
    fresh = ctx.initial_network(role)
    return None if fresh is None else _collect_eval(ctx, fresh, limit)


@hookimpl
def resinspect_estimate(ctx) -> float:
    """One forward pass of the test images through each network, and through the model at initialisation; the
    statistics its hooks take of every layer's output cost about four passes more (measured on torchvision's
    resnet50 at 224 px: 36 s where the passes alone take 7)."""
    images = ctx.test_images(ctx.options()["samples"])
    return 5.0 * ctx.multiply_adds() * images * (len(ctx.networks()) + (1 if ctx.trained_in_run else 0))


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options(NAME)
    s = Section(title="Activations", explanation=EXPLANATION, docs="explainer-responses")
    s.key_metrics = ["branch_ratio_median", "model/response_std_mean"]
    stats = {role: _collect_eval(ctx, m, opts["samples"]) for role, m in ctx.networks()}
    labels = {role: ctx.label(role) for role in ("model", "twin")}
    # response strength
    resp = {role: {n: mo.std for n, mo in st.responses.items()} for role, st in stats.items()}
    names = list(resp["model"])
    if names:
        cols = ["layer", f"std ({labels['model']})"] + ([f"std ({labels['twin']})"] if "twin" in resp else [])
        table = [[n, resp["model"][n]] + ([resp["twin"].get(n, float("nan"))] if "twin" in resp else []) for n in names]
        s.table("Response strength: std of each 3×3 conv's output after BN", cols, table)
        for role, r in resp.items():
            s.metrics[f"{role}/response_std_mean"] = float(np.mean(list(r.values())))
        if "twin" in resp and resp["twin"]:
            shared = [n for n in names if n in resp["twin"]]
            rm = float(np.mean([resp["model"][n] for n in shared]))
            pm = float(np.mean([resp["twin"][n] for n in shared]))
            ratio = rm / pm
            verdict = (
                "smaller with shortcuts, as He et al. (2016) found"
                if ratio < 0.9
                else "larger with shortcuts, unlike He et al. (2016)"
                if ratio > 1.1
                else "about the same (He et al. saw smaller residual responses after long training, as the "
                "BatchNorm scales shrink)"
            )
            s.metrics["response_ratio_residual_to_plain"] = ratio
            s.finding(
                f"Response strength: the 3×3 layers of {labels['model']} respond with a mean std of {rm:.3f}, "
                f"those of its plain twin {labels['twin']} with {pm:.3f} over the same {len(shared)} layers "
                f"({ratio:.2f}×): {verdict}.",
                "good" if ratio < 0.9 else "info",
            )
    # blocks
    st = stats["model"]
    blocks = residual_blocks(ctx.model)
    if blocks and st.images:
        # nothing trained in this run (a loaded or pretrained model): its initial state is the one measured
        init = _at_init(ctx, "model", opts["samples"]) if ctx.trained_in_run else st
        rows: list[list[Any]] = []
        for b in blocks:
            ratio = st.ratio_sum[b.name] / st.images
            cos = st.cos_sum[b.name] / st.images
            sm = st.stream[b.name]
            row = [b.name, ratio, cos, sm.mean_sq_channel_mean(), sm.avg_channel_var()]
            if init is not None:
                im = init.stream[b.name]
                row += [im.mean_sq_channel_mean(), im.avg_channel_var()]
            rows.append(row)
            s.metrics[f"block/{b.name}/branch_ratio"] = ratio
            s.metrics[f"block/{b.name}/cosine"] = cos
            s.metrics[f"block/{b.name}/avg_channel_var"] = sm.avg_channel_var()
        cols = ["block", "‖F(x)‖/‖x‖", "cos(F(x), x)", "mean² (trained)", "variance (trained)"]
        if init is not None:
            cols += ["mean² (init)", "variance (init)"]
        s.table("Residual blocks: branch size, alignment and signal propagation", cols, rows)
        near = [(b.name, r[1]) for b, r in zip(blocks, rows) if r[1] < opts["identity_threshold"]]
        if near:
            s.finding(
                f"Blocks close to the identity (‖F(x)‖/‖x‖ < {opts['identity_threshold']:g}): "
                + ", ".join(f"{n} ({v:.3f})" for n, v in near[:8])
                + ".",
                "info",
            )
        else:
            s.finding(
                f"No block is close to the identity: ‖F(x)‖/‖x‖ ranges from {min(r[1] for r in rows):.3f} to "
                f"{max(r[1] for r in rows):.3f}.",
                "info",
            )
        s.metrics["branch_ratio_median"] = float(np.median([r[1] for r in rows]))
        s.block_column("||F(x)||/||x||", {b.name: r[1] for b, r in zip(blocks, rows)})
        _figures(s, blocks, rows, init is not None, resp, labels)
    elif not blocks:
        s.finding(
            f"{ctx.model_name} has no residual blocks ({no_blocks_reason(blocks)}): no branch ratios or "
            "residual-stream statistics.",
            "warning" if getattr(blocks, "untraced", None) else "info",
        )
        _figures(s, [], [], False, resp, labels)
    # dead units
    for role, stt in stats.items():
        dead = {k: (v <= 0).float().mean().item() for k, v in stt.relu_max.items()}
        if not dead:
            continue
        s.metrics[f"{role}/dead_relu_fraction_max"] = max(dead.values())
        s.table(
            f"Dead ReLU units: {labels[role]}",
            ["ReLU (use)", "channels", "dead fraction"],
            [[k, len(stt.relu_max[k]), v] for k, v in dead.items()],
        )
        bad = [(k, v) for k, v in dead.items() if v > opts["dead_threshold"]]
        if bad:
            s.finding(
                f"{labels[role]}: {len(bad)} ReLU layer(s) with more than {opts['dead_threshold']:.0%} dead "
                "channels: " + ", ".join(f"{k} ({v:.0%})" for k, v in bad[:6]) + ".",
                "warning",
            )
        else:
            s.finding(
                f"{labels[role]}: no dead ReLU layers (worst: {max(dead.values()):.0%} of channels never "
                "fire on the test set).",
                "good",
            )
    return s


def _figures(s: Section, blocks, rows, has_init: bool, resp, labels) -> None:
    plt = pyplot()

    if resp.get("model"):
        names = list(resp["model"])
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 3.6))
        for role, r in resp.items():
            ax.plot([r.get(n, np.nan) for n in names], marker="o", ms=3, label=labels[role])
        ax.set(
            xlabel="3×3 layer index (input → output)",
            ylabel="std of response",
            title="Response strength per layer (He et al. 2016, Fig. 7)",
        )
        ax.legend()
        s.figure(
            fig,
            "Response strength",
            "Standard deviation of each 3×3 conv's BN output over the test set; "
            "residual network and plain twin on the same layers.",
        )
    if rows:
        x = np.arange(len(rows))
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
        a.bar(x, [r[1] for r in rows], color="#2c5aa0", label="‖F(x)‖/‖x‖")
        a.plot(x, [r[2] for r in rows], "o-", color="#c0504d", label="cos(F(x), x)")
        a.axhline(0, color="k", lw=0.6)
        a.set_xticks(x, [r[0] for r in rows], rotation=70, fontsize=7)
        a.set(title="How much each block changes its input")
        a.legend(fontsize=8)
        b.plot(x, [r[4] for r in rows], "o-", label="variance, trained")
        b.plot(x, [r[3] for r in rows], "s-", label="mean², trained")
        if has_init:
            b.plot(x, [r[6] for r in rows], "o--", label="variance, init")
            b.plot(x, [r[5] for r in rows], "s--", label="mean², init")
        b.set_xticks(x, [r[0] for r in rows], rotation=70, fontsize=7)
        b.set(yscale="log", title="Signal propagation of the residual stream")
        b.legend(fontsize=7)
        s.figure(
            fig,
            "Residual blocks",
            "Left: relative size and alignment of each branch. Right: average "
            "channel variance and mean squared channel mean at each block's output (Brock et al. 2021).",
        )
