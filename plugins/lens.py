"""Reading the residual stream through the network's own head: the logit lens (nostalgebraist 2020), the tuned
lens (Belrose et al. 2023) and a linear probe (Alain & Bengio 2016), at every residual block or site, for the
model and its plain twin."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resinspect import NoHead, Section, capture, cross_entropy, eval_mode, hookimpl, no_blocks_reason, pyplot

NAME = "lens"

EXPLANATION = """\
A residual network writes into one stream that every block reads and adds to; its head (pooling or the class \
token, normalisation, classifier, found by tracing: ctx.head()) reads the end of it. The logit lens reads an \
earlier point of the stream through the same head: where the stream has the final stream's shape, head(stream) \
gives logits, whose accuracy, cross-entropy and KL divergence from the network's own output distribution say \
how much of the final prediction is already there (nostalgebraist 2020). Jastrzebski et al. 2018 argue that \
residual blocks refine a representation step by step, so the readout should approach the final one gradually; \
a plain network has no stream, and its intermediate layers need not speak the head's language at all.

The tuned lens (Belrose et al. 2023) fits, for each point, an affine translator into the final stream (a \
linear map over channels or token features, identity-initialised where the widths agree, after average pooling \
to the final spatial size for feature maps) by minimising the KL divergence from the final output on training \
images, and is scored on the test images: it also reads points the head cannot take (other widths or \
resolutions). The linear probe is the same translator fitted to the labels instead (Alain & Bengio 2016: linear \
separability grows with depth). "Converged from" is the first point from which every later readout stays \
within the tolerance of the final accuracy."""


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 0, "test images to read (0: the whole test set)", bounds="[0, 100_000_000]")
    options.add("tuned", bool, True, "fit a tuned-lens translator at every point (else the logit lens only)")
    options.add("probe", bool, True, "fit a linear probe on the labels at every point (the baseline)")
    options.add(
        "fit_samples", int, 256, "training images the translators and probes are fitted on", bounds="[8, 1_000_000]"
    )
    options.add(
        "fit_tokens",
        int,
        4096,
        "for a language model: at most this many tokens (whole sequences) for the translators and probes",
        bounds="[8, 100_000_000]",
    )
    options.add("steps", int, 100, "optimisation steps per translator (Adam, full batch)", bounds="[1, 100_000]")
    options.add("lr", float, 0.01, "learning rate of the translators", bounds="(0, 10]")
    options.add(
        "tolerance", float, 5.0, "points of accuracy within which a readout counts as converged", bounds="(0, 100]"
    )


class Translator(nn.Module):
    """An affine map from a stream of shape ``src`` into the final stream's shape ``dst`` (per-sample shapes):
    token streams ``(N, D)`` → ``(N, D')`` over the feature dimension; feature maps ``(C, H, W)`` → ``(C', H', W')``
    by average pooling to ``H'×W'`` then a map over channels. Identity-initialised when the widths agree."""

    def __init__(self, src: tuple[int, ...], dst: tuple[int, ...], tokens: tuple[torch.Tensor, int] | None = None):
        super().__init__()
        if not translatable(src, dst):
            raise ValueError(f"no translator from a stream of shape {src} to {dst}")
        self.image = len(dst) == 3
        self.dst = dst
        # the tokens the head reads (a ViT's class token): the map is per token, so the others need no work
        self.tokens = None if self.image or tokens is None else tokens[0]
        self.length: int = dst[0] if self.image or tokens is None else tokens[1]
        d_in, d_out = src[0 if self.image else -1], dst[0 if self.image else -1]
        self.linear = nn.Linear(d_in, d_out)
        with torch.no_grad():
            if d_in == d_out:
                self.linear.weight.copy_(torch.eye(d_in))
            else:
                nn.init.normal_(self.linear.weight, std=d_in**-0.5)
            self.linear.bias.zero_()

    def prepare(self, s: torch.Tensor) -> torch.Tensor:
        return prepared(s, self.dst, None if self.tokens is None else (self.tokens, self.length))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.image:
            return self.linear(f.movedim(1, -1)).movedim(-1, 1)
        if self.tokens is None:
            return self.linear(f)
        # tokens the head does not read: any value gives the same logits (and those after the last one it reads
        # are left out where the head gives the same logits without them: see tokens_read)
        out = f.new_zeros((len(f), self.length, self.dst[-1]))
        out[:, self.tokens] = self.linear(f)
        return out


def prepared(s: torch.Tensor, dst: tuple[int, ...], tokens: tuple[torch.Tensor, int] | None) -> torch.Tensor:
    """What a translator into the final stream's shape ``dst`` keeps of a stream: a feature map pooled to the
    final size, of a token stream the tokens the head reads (``tokens``, see :func:`tokens_read`): cheaper to
    store and to fit."""
    if len(dst) == 3:
        return F.adaptive_avg_pool2d(s, (dst[1], dst[2]))
    return s if tokens is None else s[:, tokens[0]]


def tokens_read(head: nn.Module, streams: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(positions, length)``: the token positions of a (B, N, D) stream on which ``head``'s output depends
    (by the gradient of its logits at two example streams), and how many leading tokens it needs (the last
    read position + 1 when the head gives the same logits for the stream cut there, else N). None for feature
    maps or when the head reads every token."""
    if streams.dim() != 3:
        return None
    x = streams[:2].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = head(x)
        (g,) = torch.autograd.grad(out.sum(), x)
    used = (g.abs().sum((0, 2)) > 0).nonzero().flatten()
    if len(used) == streams.shape[1] or not len(used):
        return None
    length = int(used.max()) + 1
    try:
        same = torch.allclose(head(x[:, :length].detach()), out.detach(), rtol=1e-5, atol=1e-6)
    except (RuntimeError, ValueError, IndexError):  # the head needs the whole stream (a reshape to a grid)
        same = False
    return used, length if same else streams.shape[1]


def translatable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    if len(src) == len(dst) == 3:
        return src[1] >= dst[1] and src[2] >= dst[2]
    return len(src) == len(dst) == 2 and src[0] == dst[0]


@contextmanager
def stream_hooks(points: list[tuple[str, nn.Module, str]]) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
    """Each point's stream (the first block's input, every block's output) through :func:`resinspect.capture`:
    yields ``take()``, which after a forward pass returns ``{point: stream}`` and clears the store."""
    entering = {name: m for name, m, where in points if where == "input"}
    leaving = {name: m for name, m, where in points if where == "output"}
    with capture(entering, outputs=False) as ins, capture(leaving, inputs=False) as outs:

        def take() -> dict[str, torch.Tensor]:
            got = {**ins.inputs, **outs.outputs}
            ins.clear()
            outs.clear()
            return got

        yield take


def points_of(ctx, role: str) -> list[tuple[str, nn.Module, str]]:
    """The points read: the stream entering the first block, then each block's or site's output."""
    pairs = [(b.name, b.module) for b in ctx.blocks("model")] if role == "model" else ctx.twin_counterparts()
    pairs = [(getattr(b, "name", b), m) for b, m in pairs if m is not None]
    if not pairs:
        return []
    return [("input", pairs[0][1], "input")] + [(name, m, "output") for name, m in pairs]


def _fit(jobs: list[tuple[Translator, torch.Tensor, torch.Tensor]], head: nn.Module, opts: dict) -> None:
    """Fit every translator so that ``head(translator(features))`` matches its target (class probabilities,
    or labels for a probe) by cross-entropy. The translators are independent (a sum of their losses has the
    same gradients, and Adam is elementwise), so they are fitted together, with one pass through the head
    per step. Only the translators move: no gradient reaches the network's own parameters."""
    if not jobs:
        return
    params = [p for t, _, _ in jobs for p in t.parameters()]
    optimiser = torch.optim.Adam(params, lr=opts["lr"])
    sizes = [len(f) for _, f, _ in jobs]
    for _ in range(opts["steps"]):
        with torch.enable_grad():
            logits = head(torch.cat([t(f) for t, f, _ in jobs]))
            loss = torch.stack(
                [cross_entropy(chunk, target) for chunk, (_, _, target) in zip(torch.split(logits, sizes), jobs)]
            ).sum()
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimiser.step()
    for p in params:
        p.grad = None


def _collect(ctx, net: nn.Module, head: nn.Module, points, images: int) -> dict[str, Any]:
    """What the translators are fitted on, from ``images`` training images: per translatable point the
    :func:`prepared` features, taken batch by batch (the whole streams of a few hundred images would not fit
    in memory at ImageNet scale); the streams' shapes, the tokens the head reads, the final logits, the labels."""
    feats: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    read = None
    logits, labels = [], []
    with stream_hooks(points) as take:
        for x, y in ctx.train_batches(images):
            logits.append(net(x).detach())
            labels.append(y)
            seen = take()
            final = seen[points[-1][0]]
            if not shapes:
                shapes = {name: tuple(seen[name].shape[1:]) for name, _, _ in points}
                read = tokens_read(head, final)
                feats = {name: [] for name in shapes if translatable(shapes[name], shapes[points[-1][0]])}
            for name, kept in feats.items():
                kept.append(prepared(seen[name], shapes[points[-1][0]], read))
    return {
        "features": {k: torch.cat(v) for k, v in feats.items()},
        "shapes": shapes,
        "read": read,
        "logits": torch.cat(logits),
        "labels": torch.cat(labels),
    }


def read_network(ctx, role: str, opts: dict) -> dict:
    """Every readout of one network: per point, the logit lens (where the head fits), the tuned lens and the
    probe (fitted on training images), all scored on the test images."""
    net = dict(ctx.networks())[role]
    head = ctx.head(role)
    points = points_of(ctx, role)
    with eval_mode(net), torch.no_grad():
        fit = _collect(ctx, net, head, points, fit_sequences(ctx, opts))
        shapes, train_labels = fit["shapes"], fit["labels"]
        final_shape = shapes[points[-1][0]]
        lenses: dict[str, dict[str, Translator]] = {"tuned": {}, "probe": {}}
        soft = torch.softmax(fit["logits"].double(), -1).float()
        jobs = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # the same translators in every process (and run), the global RNG untouched
            for kind, target, wanted in (("tuned", soft, opts["tuned"]), ("probe", train_labels, opts["probe"])):
                for name, _, _ in points:
                    if wanted and name in fit["features"]:
                        t = Translator(shapes[name], final_shape, fit["read"]).to(train_labels.device)
                        lenses[kind][name] = t
                        jobs.append((t, fit["features"][name], target))
        del fit
        _fit(jobs, head, opts)
        sums: dict[str, Any] = {"n": 0.0, "final_correct": 0.0, "final_ce": 0.0}
        with stream_hooks(points) as take:
            for x, y in ctx.shard(ctx.test_batches(ctx.test_images(opts["samples"]))):
                out = net(x)
                seen = take()
                logp_final = torch.log_softmax(out.double(), -1)
                sums["n"] += y.numel()
                sums["final_correct"] += float((out.argmax(-1) == y).sum())
                sums["final_ce"] += float(cross_entropy(logp_final, y, reduction="sum"))
                for name, _, _ in points:
                    s = seen[name]
                    readouts = {}
                    if tuple(s.shape[1:]) == final_shape:
                        readouts["logit"] = head(s)
                    for kind in ("tuned", "probe"):
                        if name in lenses[kind]:
                            t = lenses[kind][name]
                            readouts[kind] = head(t(t.prepare(s)))
                    for kind, logits in readouts.items():
                        logq = torch.log_softmax(logits.double(), -1)
                        key = f"{name}|{kind}"
                        sums[f"{key}|correct"] = sums.get(f"{key}|correct", 0.0) + float((logits.argmax(-1) == y).sum())
                        sums[f"{key}|ce"] = sums.get(f"{key}|ce", 0.0) + float(cross_entropy(logq, y, reduction="sum"))
                        kl = (logp_final.exp() * (logp_final - logq)).sum(-1)
                        sums[f"{key}|kl"] = sums.get(f"{key}|kl", 0.0) + float(kl.sum())
                        if kind == "logit" and kl.dim() == 2:  # a language model: KL per position
                            sums[f"{key}|kl_pos"] = sums.get(f"{key}|kl_pos", 0.0) + kl.sum(0).double().cpu()
    sums = ctx.all_reduce(sums)
    n = max(sums["n"], 1.0)
    result: dict[str, Any] = {
        "points": [name for name, _, _ in points],
        "shapes": {k: list(v) for k, v in shapes.items()},
        "final_accuracy": 100.0 * sums["final_correct"] / n,
        "final_ce": sums["final_ce"] / n,
        "images": int(sums["n"]),
        "fit_images": int(len(train_labels)),
        "read": {},
    }
    for name, _, _ in points:
        for kind in ("logit", "tuned", "probe"):
            key = f"{name}|{kind}"
            if f"{key}|correct" in sums:
                result["read"].setdefault(kind, {})[name] = {
                    "accuracy": 100.0 * sums[f"{key}|correct"] / n,
                    "ce": sums[f"{key}|ce"] / n,
                    "kl": sums[f"{key}|kl"] / n,
                }
                if f"{key}|kl_pos" in sums:  # per position: over the sequences (n counts their tokens)
                    per = sums[f"{key}|kl_pos"]
                    result["read"][kind][name]["kl_by_position"] = (per * len(per) / n).tolist()
    return result


@hookimpl
def resinspect_estimate(ctx) -> float:
    """Per network: a forward pass over the fitting and the test samples, and the translators' and probes'
    fit: ``steps`` steps of three passes' worth through a translator and the head for every fitted sample
    and point (the head and the translator costed from the model's last linear layer, at every position of a
    language model)."""
    opts = ctx.options(NAME)
    blocks = ctx.blocks("model")
    if not blocks:
        return 0.0
    fit = ctx.train_images(fit_sequences(ctx, opts))
    test = ctx.test_images(opts["samples"])
    last = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)]
    per_row = (last[-1].in_features * (last[-1].out_features + last[-1].in_features)) if last else 0
    rows = fit * (ctx.data.image_size if ctx.task.is_language else 1)
    kinds = int(opts["tuned"]) + int(opts["probe"])
    fitting = opts["steps"] * 3 * kinds * (len(blocks) + 1) * rows * per_row
    return len(ctx.networks()) * (float(ctx.multiply_adds()) * (fit + test) + fitting)


def fit_sequences(ctx, opts: dict) -> int:
    """How many training samples the translators are fitted on: ``fit_samples``, and for a language model no
    more whole sequences than hold ``fit_tokens`` tokens (every position is a row of the fit)."""
    if not ctx.task.is_language:
        return opts["fit_samples"]
    return max(1, min(opts["fit_samples"], -(-opts["fit_tokens"] // max(1, ctx.data.image_size))))


def converged_from(points: list[str], read: dict[str, dict], final: float, tolerance: float) -> str | None:
    """The first point from which every later point's readout is within ``tolerance`` points of ``final``
    (points without a readout break the run: they are not read)."""
    found = None
    for name in points:
        r = read.get(name)
        if r is not None and abs(r["accuracy"] - final) <= tolerance:
            found = found or name
        else:
            found = None
    return found


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options()
    s = Section(title="Lens: reading the stream through the head", explanation=EXPLANATION, docs="explainer-lens")
    s.key_metrics = ["model/logit/converged_depth", "model/tuned/converged_depth"]
    blocks = ctx.blocks("model")
    if not blocks:
        return s.skip(f"{ctx.model_name} has no residual blocks ({no_blocks_reason(blocks)}), so no stream to read")
    try:
        ctx.head("model")
    except NoHead as e:
        return s.skip(f"no head to read the stream through: {e}")
    results = {}
    for role, _ in ctx.networks():
        if role == "twin" and not points_of(ctx, "twin"):
            s.finding(f"The twin {ctx.label('twin')} has no layers named like the model's blocks: not read.")
            continue
        try:
            results[role] = read_network(ctx, role, opts)
        except NoHead as e:
            s.finding(f"{ctx.label(role)}: no head to read the stream through: {e}.", "warning")
    _report(s, ctx, results, opts)
    return s


def _report(s: Section, ctx, results: dict, opts: dict) -> None:
    tol = opts["tolerance"]
    converged: dict[tuple[str, str], float | None] = {}
    for role, r in results.items():
        points = r["points"]
        s.metrics[f"{role}/final_accuracy"] = r["final_accuracy"]
        s.metrics[f"{role}/points"] = len(points)
        for kind, read in r["read"].items():
            first = converged_from(points, read, r["final_accuracy"], tol)
            depth = points.index(first) / (len(points) - 1) if first is not None else float("nan")
            converged[(role, kind)] = depth if first is not None else None
            s.metrics[f"{role}/{kind}/points_read"] = len(read)
            s.metrics[f"{role}/{kind}/converged_depth"] = depth
            if first is not None:
                s.metric(f"{role}/{kind}/converged_from", first, tensorboard=False)
            for i, name in enumerate(points):
                if name in read:
                    for m in ("accuracy", "kl", "ce"):
                        s.metric(f"{role}/{kind}/{m}/{name}", read[name][m], tensorboard=False)
                    ctx.log_scalars(
                        {f"{kind}_accuracy": read[name]["accuracy"], f"{kind}_kl": read[name]["kl"]}, i, role=role
                    )
        rows = []
        for name in points:
            row: list = [name, "×".join(map(str, r["shapes"][name]))]
            for kind in ("logit", "tuned", "probe"):
                got = r["read"].get(kind, {}).get(name)
                row += [got["accuracy"], got["kl"]] if got else [None, None]
            rows.append(row)
        s.table(
            f"Readouts of {ctx.label(role)} (final accuracy {r['final_accuracy']:.1f}%, {r['images']} test "
            f"{ctx.task.prediction}s; translators fitted on {r['fit_images']} training {ctx.task.sample}s"
            + (f", at most -o lens.fit_tokens={opts['fit_tokens']} tokens)" if ctx.task.is_language else ")"),
            [
                "point",
                "stream",
                "logit lens acc %",
                "logit lens KL",
                "tuned lens acc %",
                "tuned lens KL",
                "probe acc %",
                "probe KL",
            ],
            rows,
        )
    model = results.get("model")
    if model is not None:
        for kind, column in (("logit", "logit-lens accuracy"), ("tuned", "tuned-lens accuracy")):
            read = model["read"].get(kind, {})
            if read:
                s.block_column(column, {k: v["accuracy"] for k, v in read.items() if k != "input"}, "smaller")
        _findings(s, ctx, results, converged, tol)
        _figure(s, ctx, results)


def _findings(s: Section, ctx, results: dict, converged: dict, tol: float) -> None:
    model = results["model"]
    n = len(model["points"])
    logit = model["read"].get("logit", {})
    s.finding(
        f"The head of {ctx.model_name} reads {len(logit)} of its {n} stream points directly"
        + (" (the others have another shape and are read through a fitted translator only)." if len(logit) < n else ".")
    )
    chance = 100.0 / max(ctx.data.num_classes, 1)
    if model["final_accuracy"] <= chance + tol:
        s.finding(
            f"{ctx.model_name} is at chance level ({model['final_accuracy']:.1f}% against {chance:.1f}%): "
            "every readout agrees with an output that carries no information, so where the stream "
            "'converges' says nothing here.",
            "warning",
        )
        return
    for kind, label in (("logit", "logit lens"), ("tuned", "tuned lens")):
        if ("model", kind) not in converged:
            continue
        mine = converged[("model", kind)]
        read = model["read"][kind]
        first = converged_from(model["points"], read, model["final_accuracy"], tol)
        where = f"from {first} on ({mine:.0%} of the way through)" if first else "at no point"
        text = (
            f"{label.capitalize()}: {ctx.model_name}'s readout is within {tol:g} points of its final accuracy {where}"
        )
        twin_at_chance = "twin" in results and results["twin"]["final_accuracy"] <= chance + tol
        if twin_at_chance:
            text += (
                f"; the plain twin {ctx.label('twin')} is at chance level ({results['twin']['final_accuracy']:.1f}%), "
                "so its readouts agree with an output that says nothing: no comparison."
            )
        elif ("twin", kind) in converged and "twin" in results:
            twin = converged[("twin", kind)]
            t_first = converged_from(
                results["twin"]["points"], results["twin"]["read"][kind], results["twin"]["final_accuracy"], tol
            )
            t_where = f"from {t_first} on ({twin:.0%})" if t_first else "at no point"
            text += f"; the plain twin {ctx.label('twin')}'s {t_where}."
            if mine is not None and (twin is None or mine < twin):
                text += (
                    " The residual stream converges earlier, as iterative refinement predicts "
                    "(Jastrzebski et al. 2018)."
                )
            else:
                text += " The residual stream does not converge earlier here: the expected effect does not show."
        else:
            text += "."
        s.finding(text)


def _figure(s: Section, ctx, results: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {"model": "-", "twin": "--"}
    colors = {"logit": "C0", "tuned": "C1", "probe": "C2"}
    for role, r in results.items():
        depth = np.linspace(0, 1, len(r["points"])) if len(r["points"]) > 1 else np.zeros(1)
        for kind, read in r["read"].items():
            acc = [read[p]["accuracy"] if p in read else math.nan for p in r["points"]]
            kl = [read[p]["kl"] if p in read else math.nan for p in r["points"]]
            label = f"{ctx.label(role)} {kind}"
            axes[0].plot(depth, acc, styles[role], color=colors[kind], marker=".", label=label)
            axes[1].plot(depth, kl, styles[role], color=colors[kind], marker=".", label=label)
        axes[0].axhline(r["final_accuracy"], color="grey", ls=styles[role], lw=0.8)
    axes[0].set(xlabel="depth (fraction of the stream points)", ylabel="test accuracy of the readout (%)")
    axes[1].set(xlabel="depth (fraction of the stream points)", ylabel="KL(final ‖ readout), nats", yscale="symlog")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    s.figure(fig, "Readout accuracy and KL by depth", "solid: the model; dashed: its plain twin; grey: final accuracy")
    _position_heatmap(s, ctx, results)


def _position_heatmap(s: Section, ctx, results: dict) -> None:
    """A language model's logit-lens KL to the final distribution, stream point × position, model and twin."""
    grids = {}
    for role, r in results.items():
        read = r.get("read", {}).get("logit", {})
        rows = [(name, v["kl_by_position"]) for name, v in read.items() if "kl_by_position" in v]
        if rows:
            grids[role] = rows
            for t in range(len(rows[0][1])):  # one event per position, every point's curve over positions
                ctx.log_scalars({f"kl_by_position/{name}": float(per[t]) for name, per in rows}, t, role=role)
    if not grids:
        return
    plt = pyplot()
    fig, axes = plt.subplots(
        1, len(grids), figsize=(5.5 * len(grids), 0.35 * max(len(g) for g in grids.values()) + 1.8)
    )
    axes = [axes] if len(grids) == 1 else list(axes)
    top = max(max(max(per) for _, per in g) for g in grids.values())
    for ax, (role, rows) in zip(axes, grids.items()):
        im = ax.imshow([per for _, per in rows], aspect="auto", cmap="magma", vmin=0, vmax=top or 1)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([name for name, _ in rows], fontsize=6)
        ax.set(xlabel="position", title=f"{ctx.label(role)}: logit-lens KL (nats)")
        ax.title.set_fontsize(8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    s.figure(
        fig,
        "Logit-lens KL by stream point and position",
        "Each row a point of the stream, each column a position of the sequence: how far the head's reading there "
        "is from the final next-token distribution.",
    )
