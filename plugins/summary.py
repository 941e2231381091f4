"""Architecture summary: layers, shapes, parameters and mult-adds, the residual block map, and the unraveled view.

The unraveled view follows Veit et al. (2016): N residual blocks give 2^N
input-output paths whose lengths (number of branches taken) follow
Binomial(N, 1/2).
"""

from __future__ import annotations

import collections
import math
from typing import Any

import torch
from torch import nn

from resinspect import Section, capture, eval_mode, hookimpl, no_blocks_reason, pyplot, residual_blocks, untraced_note

NAME = "summary"

EXPLANATION = """\
The layer table is torchinfo's summary of the model for one input of the dataset's shape: output shape, \
parameters and mult-adds per layer.

The block map lists every residual block the anatomy found (by tracing the forward pass for an addition of a \
module's input to a branch): its stage, whether it downsamples, whether its shortcut is the identity or a \
projection, and its parameters. The receptive field of each stage's output is measured, not estimated: the \
extent of input pixels with a non-zero gradient for one output position, on a random probe input of the \
dataset's image size (at least 96×96), measured again on a probe twice as large while the field fills it \
(up to 1024 px, and as far as two probe images stay within 5e10 multiply-adds; a field that still fills the \
largest probe is shown as "≥" its size).

Unraveled, a network of N residual blocks is a collection of 2^N paths from input to output, one per choice \
of skip or branch in each block. A path's length (how many branches it passes through) follows \
Binomial(N, 1/2): most paths are of moderate length, and very few are as deep as the network."""


# the receptive-field probes beyond the image size: two images of at most this many multiply-adds together
# (torchvision's resnet50 and convnext_tiny: up to 448 px; resnet20 on digits: up to 1024 px)
PROBE_MACS = 5e10


@hookimpl
def resinspect_addoptions(options):
    options.add("depth", int, 3, "nesting depth of the torchinfo layer table", bounds="[1, 20]")


def path_length_distribution(n_blocks: int) -> list[tuple[int, int, float]]:
    """``[(length, number of paths, fraction)]`` for ``n_blocks`` residual blocks (Binomial(N, 1/2))."""
    total = 2**n_blocks
    return [(k, math.comb(n_blocks, k), math.comb(n_blocks, k) / total) for k in range(n_blocks + 1)]


def central_range(n_blocks: int, mass: float = 0.95) -> tuple[int, int, float]:
    """The narrowest interval of path lengths, centred on N/2, that holds at least ``mass`` of the paths."""
    dist = {k: f for k, _, f in path_length_distribution(n_blocks)}
    lo = hi = n_blocks // 2
    covered = dist[lo] if n_blocks % 2 == 0 else dist[lo] + dist[lo + 1]
    if n_blocks % 2:
        hi = lo + 1
    while covered < mass - 1e-12:
        lo, hi = lo - 1, hi + 1
        covered += dist.get(lo, 0.0) + dist.get(hi, 0.0)
    return max(lo, 0), min(hi, n_blocks), covered


def receptive_fields(
    model: nn.Module,
    stages: dict[str, nn.Module],
    in_channels: int,
    device: torch.device,
    size: int = 96,
    largest: int = 1024,
) -> dict[str, tuple[int, int]]:
    """Measured receptive field (pixels, one side) of each stage's output at the centre position, with the
    probe size it was measured on: ``{stage: (field, probe)}``. A field that reaches both edges of the probe
    is measured again on a probe twice as large (up to ``largest`` pixels); one that still fills it is
    returned as ``(probe, probe)``: at least that."""
    fields: dict[str, tuple[int, int]] = {}
    todo = dict(stages)
    images = 4
    while todo:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(images, in_channels, size, size, generator=gen).to(device).requires_grad_(True)
        with capture(todo, inputs=False, detach=False) as seen, eval_mode(model):
            model(x)
        again = {}
        for name, out in seen.outputs.items():
            if out.dim() != 4:
                continue
            h, w = out.shape[-2:]
            (g,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), x, retain_graph=True)
            rows = g.abs().sum(dim=(0, 1, 3)).nonzero()
            field = int(rows.max() - rows.min() + 1) if len(rows) else 0
            fields[name] = (field, size)
            if field >= size and 2 * size <= largest:
                again[name] = todo[name]
        todo, size, images = again, 2 * size, 2
    return fields


def _torchinfo_rows(model: nn.Module, input_size: tuple[int, ...], depth: int, device: torch.device, tokens: bool):
    import torchinfo

    stats = torchinfo.summary(
        model,
        **({"input_data": torch.zeros(input_size, dtype=torch.long)} if tokens else {"input_size": input_size}),
        depth=depth,
        verbose=0,
        device=device,
        col_names=("output_size", "num_params", "mult_adds"),
    )
    rows = []
    for layer in stats.summary_list:
        if layer.depth > depth:
            continue
        leaf = layer.is_leaf_layer or layer.depth == depth
        rows.append(
            [
                "  " * layer.depth + layer.get_layer_name(True, False),
                str(list(layer.output_size)),
                layer.num_params,
                layer.macs if leaf else "",
            ]
        )
    return stats, rows


@hookimpl
def resinspect_estimate(ctx) -> float:
    """torchinfo's forward of one image per network, and the receptive-field probe: four images forward and a
    backward per stage (about as many again on a probe twice as large, where a field fills the first)."""
    if ctx.task.is_language:
        return float(ctx.multiply_adds()) * len(ctx.networks())
    size = max(96, ctx.data.image_size)
    stages = len({b.stage_name for b in ctx.blocks("model")})
    probe = 2 * 4 * (size / max(ctx.data.image_size, 1)) ** 2 * (1 + 2 * stages)
    return float(ctx.multiply_adds()) * len(ctx.networks()) * (1 + probe)


@hookimpl
def resinspect_analyze(ctx) -> list[Section]:
    opts = ctx.options(NAME)
    sections = [_summarise(ctx, ctx.model, ctx.model_name, opts)]
    if ctx.twin is not None:
        sections.append(_summarise(ctx, ctx.twin, ctx.label("twin"), opts, is_twin=True))
    return sections


def _summarise(ctx, model: nn.Module, label: str, opts: dict[str, Any], is_twin: bool = False) -> Section:
    s = Section(
        title=f"Architecture: {label}" + (" (plain twin)" if is_twin else ""),
        explanation=EXPLANATION,
        docs="explainer-paths",
        role="twin" if is_twin else "model",
    )
    data = ctx.data
    tokens = ctx.task.is_language
    input_size = (1, data.image_size) if tokens else (1, data.in_channels, data.image_size, data.image_size)
    with eval_mode(model):
        stats, rows = _torchinfo_rows(model, input_size, opts["depth"], ctx.device, tokens)
    params = sum(p.numel() for p in model.parameters())
    s.metrics.update(
        {
            "parameters": params,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "mult_adds": int(stats.total_mult_adds),
        }
    )
    s.table(
        f"Layers (torchinfo, input {list(input_size)})",
        ["layer", "output shape", "parameters", "mult-adds"],
        rows,
        caption=f"Total: {params:,} parameters, {int(stats.total_mult_adds):,} mult-adds per {ctx.task.sample}.",
        fold=True,
    )
    blocks = residual_blocks(model)
    n = len(blocks)
    s.metrics["residual_blocks"] = n
    s.metrics["paths"] = 2**n if n <= 62 else f"2^{n}"
    note = untraced_note(blocks)
    if note:
        s.finding(f"{label}: {note}", "warning")
    if not blocks:
        s.finding(
            f"{label}: 0 residual blocks, 1 path — every signal goes through every layer ({no_blocks_reason(blocks)}).",
            "warning" if note else "info",
        )
        return s
    stages: dict[str, nn.Module] = {}
    for b in blocks:
        stages.setdefault(b.stage_name, model.get_submodule(b.stage_name) if b.stage_name else model)
    measured = {} if tokens else _fields(ctx, s, model, stages, is_twin)
    fields = {k: f if f < size else f"≥ {size}" for k, (f, size) in measured.items()}
    last_in_stage = {b.stage_name: b.name for b in blocks}
    table = []
    sites = any(b.layer != b.name for b in blocks)  # a layer with several additions: show its sites together
    for b in blocks:
        rf = fields.get(b.stage_name) if last_in_stage[b.stage_name] == b.name else None
        row = [b.name, b.stage, b.downsamples, b.shortcut_kind, b.parameters_count()] + ([] if tokens else [rf])
        table.append([b.layer, b.kind, *row] if sites else row)
    columns = ["block", "stage", "downsamples", "shortcut", "parameters"]
    columns += [] if tokens else ["receptive field at stage output (px)"]
    s.table(
        "Residual block map" + (" (residual sites, by layer)" if sites else ""),
        ["layer", "kind", *columns] if sites else columns,
        table,
    )
    if sites:
        kinds = collections.Counter(b.kind for b in blocks)
        layers = len({b.layer for b in blocks})
        s.finding(
            f"{label} adds {n} branches to its stream in {layers} layers: "
            + ", ".join(f"{c} {k}" for k, c in kinds.items())
            + " residual sites, each a block of its own in every analysis."
        )
    for stage, (rf, size) in measured.items():
        s.metrics[f"receptive_field/{stage or 'root'}"] = rf  # at least this where it fills the largest probe
        if rf >= size:
            s.metrics[f"receptive_field_fills_probe/{stage or 'root'}"] = size
    lo, hi, covered = central_range(n)
    dist = path_length_distribution(n)
    s.metrics.update({"path_length_mean": n / 2, "path_length_95_low": lo, "path_length_95_high": hi})
    s.table(
        "Unraveled view: paths by length",
        ["length (branches passed)", "paths", "fraction"],
        [[k, c if n <= 62 else f"C({n},{k})", f] for k, c, f in dist],
    )
    s.finding(
        f"{label} has {n} residual blocks in {len(stages)} stage(s): 2^{n} = {2**n:,} paths from input to "
        f"output. {covered:.1%} of them pass through between {lo} and {hi} branches (mean {n / 2:g}); only "
        f"{dist[-1][2]:.2g} of the paths use all {n} branches.",
        "info",
    )
    proj = [b.name for b in blocks if b.shortcut_kind == "projection"]
    if proj:
        s.finding(f"Projection shortcuts (every path must cross them): {', '.join(proj)}.", "info")
    _path_figure(s, n, dist, lo, hi)
    return s


def _fields(ctx, s: Section, model: nn.Module, stages: dict[str, nn.Module], is_twin: bool) -> dict:
    """Each stage's receptive field on a probe of the image size, grown while a field fills it."""
    data = ctx.data
    probe = max(96, data.image_size)
    # memory: the larger probes hold two images' forward graph; at most PROBE_MACS multiply-adds of them
    role = "twin" if is_twin else "model"
    scale = math.sqrt(PROBE_MACS / (2 * max(1, ctx.multiply_adds(role))))
    largest = max(probe, min(1024, int(data.image_size * scale)))
    try:
        return receptive_fields(model, stages, data.in_channels, ctx.device, probe, largest)
    except Exception as e:  # noqa: BLE001 - a model that cannot take the probe size still gets its block map
        s.finding(f"Receptive fields could not be measured on a {probe}×{probe} probe ({type(e).__name__}).", "info")
        return {}


def _path_figure(s: Section, n: int, dist, lo: int, hi: int) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ks = [k for k, _, _ in dist]
    fr = [f for _, _, f in dist]
    ax.bar(ks, fr, color=["#2c5aa0" if lo <= k <= hi else "#9db3d6" for k in ks])
    ax.set(
        xlabel="path length (branches passed)",
        ylabel="fraction of paths",
        title=f"Path lengths of {n} residual blocks: Binomial({n}, 1/2)",
    )
    s.figure(
        fig, "Distribution of path lengths", f"Dark bars: the central range {lo}–{hi} holding at least 95% of paths."
    )
