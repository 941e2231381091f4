"""Attention heads of a language model: previous-token and induction scores, and what each head is worth
(the in-context loss when it is silenced), for the model and its plain twin."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from resinspect import Section, capture, eval_mode, forwards_replaced, hookimpl, pyplot
from resinspect_plugins._heads import (
    attention_modules,
    head_count,
    induction_score,
    is_builtin_attention,
    previous_token_score,
    repeated_tokens,
)

NAME = "heads"

EXPLANATION = """\
Olsson et al. (2022) found that in-context learning in transformers starts with *induction heads*: an attention \
head that, at a token which occurred before, attends to the token that followed its earlier occurrence and copies \
it ("A B … A → B"). It needs a *previous-token head* in an earlier layer, whose output the induction head reads \
through the residual stream (K-composition): without the stream, layer 2 sees only layer 1's output, not the \
tokens themselves.

resinspect feeds each network random token sequences that repeat once (the first half is unpredictable, loss \
log V; the second half can be copied) and reads every head's attention pattern. The **previous-token score** is \
the mean attention from each position to the one before; the **induction score** the mean attention from a \
repeated token to the token after its earlier occurrence. Both are 1 for a head that attends only there and near \
1/t for uniform attention. The **ablation cost** of a head is how much the loss on the repeated half rises when \
that head's output is set to zero. The per-position loss shows the induction signature: a loss that drops on \
the repeat. Measured for the model and, side by side, its plain twin."""


@hookimpl
def resinspect_addoptions(options):
    options.add("sequences", int, 64, "repeated random sequences fed to each network", bounds="[1, 100_000]")
    options.add("length", int, 0, "tokens per sequence (0: the data's context length)", bounds="[0, 100_000]")
    options.add("ablate", bool, True, "measure each head's ablation cost (one forward pass per head)")


def _why_not(ctx) -> str | None:
    if not ctx.task.is_language:
        return f"dataset {ctx.data.name} is {ctx.task.name} data: attention heads are scored on a language model"
    if not attention_modules(ctx.model):
        return (
            f"{ctx.model_name} has no attention module whose patterns resinspect can read (the built-in language "
            "models gpt-tiny and attn-only-2 and the attention of hf: models have them)"
        )
    return None


def _sequences(ctx, opts) -> tuple[int, int]:
    n = opts["sequences"]
    if ctx.samples and n > ctx.samples:
        n = ctx.samples
    return n, opts["length"] or ctx.data.image_size


@hookimpl
def resinspect_estimate(ctx) -> float:
    """One forward pass over the sequences, plus one per head when ablating, for each network."""
    if _why_not(ctx) is not None:
        return 0.0
    opts = ctx.options(NAME)
    n, length = _sequences(ctx, opts)
    per_token = ctx.multiply_adds() / max(1, ctx.data.image_size)
    total = 0.0
    for _, net in ctx.networks():
        heads = sum(head_count(m) for _, m in attention_modules(net))
        total += per_token * length * n * (1 + (heads if opts["ablate"] else 0))
    return total


@contextmanager
def _patterns(modules: list[tuple[str, nn.Module]]):
    """Yields a function giving every attention module's pattern of the last forward: resinspect's own keep it
    (``keep_weights``, restored afterwards with the patterns dropped), the others' outputs are captured."""
    ours = [m for _, m in modules if is_builtin_attention(m)]
    before = [(m.keep_weights, m.last_weights) for m in ours]
    try:
        for m in ours:
            setattr(m, "keep_weights", True)  # noqa: B010 - an attribute of resinspect's attention modules
        with capture([(n, m) for n, m in modules if not is_builtin_attention(m)], inputs=False) as got:
            yield lambda: [m.last_weights if is_builtin_attention(m) else got.outputs[n][1] for n, m in modules]
    finally:
        for m, (keep, last) in zip(ours, before):
            setattr(m, "keep_weights", keep)  # noqa: B010
            setattr(m, "last_weights", last)  # noqa: B010


@contextmanager
def _silenced(m: nn.Module, mask: torch.Tensor):
    """``m``'s heads multiplied by ``mask`` (``(heads,)``): its ``head_mask``, or (another module) the input of
    its head-output projection scaled head by head."""
    if is_builtin_attention(m):
        before, m.head_mask = m.head_mask, mask
        try:
            yield
        finally:
            m.head_mask = before
        return
    proj = m.get_submodule(str(m.resinspect_head_output))
    forward = proj.forward

    def masked(x: torch.Tensor, *args, **kwargs):
        return forward(x * mask.repeat_interleave(x.shape[-1] // mask.numel()).to(x.dtype), *args, **kwargs)

    with forwards_replaced([(proj, masked)]):
        yield


def _in_context(ctx, net: nn.Module, tokens: torch.Tensor, period: int) -> tuple[torch.Tensor, float]:
    """Per-position loss (positions of the inputs, each predicting the next token) and the mean loss on the
    repeated half (inputs at ``t >= period``)."""
    logits = net(tokens[:, :-1])
    per = ctx.task.per_position(logits, tokens[:, 1:]).mean(0)
    return per, float(per[period:].mean())


def measure(ctx, net: nn.Module, tokens: torch.Tensor, period: int, ablate: bool) -> dict:
    """Scores, per-position loss and (``ablate``) ablation costs of ``net``'s heads on ``tokens``."""
    modules = attention_modules(net)
    out: dict = {"layers": [name for name, _ in modules]}
    with torch.no_grad(), eval_mode(net):
        with _patterns(modules) as patterns_of:
            per, repeat = _in_context(ctx, net, tokens, period)
            patterns = patterns_of()
        out["position_loss"] = per.cpu().numpy()
        out["repeat_loss"], out["first_loss"] = repeat, float(per[: period - 1].mean())
        out["previous"] = np.stack([previous_token_score(w).cpu().numpy() for w in patterns])
        out["induction"] = np.stack([induction_score(w, period).cpu().numpy() for w in patterns])
        if ablate:
            cost = np.zeros_like(out["induction"])
            for i, (_, m) in enumerate(modules):
                heads = head_count(m)
                for h in ctx.progress(range(heads), desc=f"ablate heads of layer {i}"):
                    mask = torch.ones(heads, device=tokens.device)
                    mask[h] = 0
                    with _silenced(m, mask):
                        cost[i, h] = _in_context(ctx, net, tokens, period)[1] - repeat
            out["cost"] = cost
    return out


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options()
    s = Section(title="Heads: previous-token and induction heads", explanation=EXPLANATION, docs="explainer-heads")
    s.key_metrics = ["model/best_induction_score", "twin/best_induction_score"]
    reason = _why_not(ctx)
    if reason is not None:
        return s.skip(reason)
    n, length = _sequences(ctx, opts)
    if n < opts["sequences"]:
        s.finding(f"Subsampled: {n} of {opts['sequences']} sequences (the run's --samples budget).")
    tokens, period = repeated_tokens(n, length + 1, ctx.data.num_classes, ctx.seed)
    tokens = tokens.to(ctx.device)
    results = {}
    for role, net in ctx.networks():
        if attention_modules(net):
            results[role] = measure(ctx, net, tokens, period, opts["ablate"])
    s.metrics.update({"sequences": n, "length": length, "period": period})
    _report(s, ctx, results, period)
    return s


def _best(grid: np.ndarray) -> tuple[int, int, float]:
    i, h = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return int(i), int(h), float(grid[i, h])


def _report(s: Section, ctx, results: dict, period: int) -> None:
    log_v = math.log(ctx.data.num_classes)
    for role, r in results.items():
        for key in ("previous", "induction") + (("cost",) if "cost" in r else ()):
            li, hi, v = _best(r[key])
            s.metrics[f"{role}/best_{'ablation_cost' if key == 'cost' else key + '_score'}"] = v
            s.metrics[f"{role}/best_{key}_head"] = f"{li}.{hi}"
            for i in range(r[key].shape[0]):
                ctx.log_scalars({f"{key}/head{h}": float(r[key][i, h]) for h in range(r[key].shape[1])}, i, role=role)
        s.metrics[f"{role}/first_half_loss"] = r["first_loss"]
        s.metrics[f"{role}/repeat_loss"] = r["repeat_loss"]
        for t, v in enumerate(r["position_loss"]):
            ctx.log_scalar("position_loss", float(v), t, role=role)
        rows = []
        for i, layer in enumerate(r["layers"]):
            for h in range(r["induction"].shape[1]):
                cost = [float(r["cost"][i, h])] if "cost" in r else []
                rows.append([layer, h, float(r["previous"][i, h]), float(r["induction"][i, h]), *cost])
        head = ["attention module", "head", "previous-token score", "induction score"]
        s.table(
            f"Heads of {ctx.label(role)}", head + (["ablation cost (nats)"] if "cost" in r else []), rows, fold=True
        )
    _findings(s, ctx, results, log_v)
    _figures(s, ctx, results, period, log_v)


def _findings(s: Section, ctx, results: dict, log_v: float) -> None:
    parts, formed = [], {}
    for role, r in results.items():
        li, hi, v = _best(r["induction"])
        formed[role] = r["repeat_loss"] < 0.5 * r["first_loss"] and v >= 0.3
        parts.append(
            f"{ctx.label(role)}: loss {r['first_loss']:.2f} on the first half → {r['repeat_loss']:.2f} on the repeat, "
            f"best induction head {li}.{hi} (score {v:.2f})"
        )
    s.finding(f"In-context loss on repeated random tokens (log V = {log_v:.2f} is chance): " + "; ".join(parts) + ".")
    if "model" in formed:
        said = "Induction heads form" if formed["model"] else "No induction head forms"
        text = f"{said} in {ctx.label('model')}"
        if "twin" in formed:
            text += f"; in the plain twin {ctx.label('twin')} they " + (
                "form too, without the residual stream." if formed["twin"] else "do not."
            )
            if formed["model"] and not formed["twin"]:
                text += " As Olsson et al. (2022) explain, the induction head reads the previous-token head's output "
                text += "composed with the tokens, which only the residual stream carries to it."
        s.finding(text + ("" if ctx.trained else " (the networks are untrained)."))
    for role, r in results.items():
        if "cost" in r:
            li, hi, v = _best(r["cost"])
            s.finding(
                f"{ctx.label(role)}: silencing head {li}.{hi} costs most, +{v:.3f} nats of loss on the repeat "
                f"(median head {float(np.median(r['cost'])):+.3f})."
            )


def _figures(s: Section, ctx, results: dict, period: int, log_v: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, (role, r) in enumerate(results.items()):
        ax.plot(r["position_loss"], color=f"C{i}", label=ctx.label(role))
    ax.axvline(period - 0.5, color="grey", ls=":", label="repeat starts")
    ax.axhline(log_v, color="grey", ls="--", lw=0.8, label="log V (chance)")
    ax.set(xlabel="position", ylabel="next-token loss (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    s.figure(
        fig, "Loss per position on repeated random tokens", "The induction signature: the loss drops on the repeat."
    )
    keys = [k for k in ("previous", "induction", "cost") if all(k in r for r in results.values())]
    fig, axes = plt.subplots(len(results), len(keys), figsize=(3.4 * len(keys), 2.6 * len(results)), squeeze=False)
    titles = {"previous": "previous-token score", "induction": "induction score", "cost": "ablation cost (nats)"}
    for row, (role, r) in enumerate(results.items()):
        for col, key in enumerate(keys):
            ax = axes[row, col]
            grid = r[key]
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1 if key != "cost" else None, aspect="auto")
            ax.set(title=f"{ctx.label(role)}: {titles[key]}", xlabel="head", ylabel="layer")
            ax.title.set_fontsize(8)
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
            fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    s.figure(fig, "Head scores, layer × head", "Each cell one head; rows layers in forward order.")
