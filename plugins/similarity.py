"""What each residual block does to the representation: linear CKA between every pair of block outputs
(Kornblith et al. 2019; the unbiased minibatch estimator of Nguyen, Raghu & Kornblith 2021), within each
block between its input, its output and its branch, and between the network and its plain twin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resinspect import Section, eval_mode, hookimpl, on_forward, pyplot
from resinspect_plugins._similarity import MIN_BATCH, HSICSums, u_centred_gram

NAME = "similarity"

EXPLANATION = """\
Centred kernel alignment (CKA) compares two layers by how they respond to the same images. For each layer \
the n×n matrix of inner products between the images' responses (its Gram matrix) is computed; CKA is the \
normalised alignment of two layers' centred Gram matrices: 1 when one layer's responses are a rotation or an \
isotropic rescaling of the other's, near 0 when they are unrelated, and it compares layers of any widths. \
It is computed here with the unbiased estimator over minibatches (Nguyen, Raghu & Kornblith 2021): per batch, \
each layer's Gram matrix with a zeroed diagonal and U-centring, every pair's HSIC at once as one matrix \
product, sums over batches, CKA once at the end. Unbiased means that two unrelated layers give values \
scattered around 0 (slightly negative values are possible) instead of a positive bias that grows with width.

The heatmap compares the input of the first block ("stem") and every block's output with every other \
(Nguyen et al. Fig. 1). A residual block adds F(x) to x, so its output stays similar to its input: the \
curve over depth gives, for each block, CKA(input, output), how little the block changed the \
representation, and CKA(input, F(x)), how much of the input the branch itself carries. Deep or wide residual \
networks show runs of consecutive blocks whose outputs are nearly identical (CKA above 0.95), the \
"block structure" of Nguyen et al.: such blocks barely change the representation and are candidates for \
removal, which the lesion study (plugin ablation) can confirm. With --twin, the model-vs-twin matrix shows \
where the plain network computes something the residual one does not."""


@hookimpl
def resinspect_addoptions(options):
    options.add(
        "images", int, 512, "test images to compare the layers on (0: the whole test set)", bounds="[0, 100_000_000]"
    )
    options.add(
        "structure_threshold",
        float,
        0.95,
        "consecutive blocks whose outputs have CKA above this form a block structure",
        bounds="(0, 1]",
    )
    options.add(
        "branches", bool, True, "also compare each block's input with its branch F(x) (one extra branch pass per block)"
    )


@dataclass
class _Net:
    """The layers of one network whose Gram matrices are taken, in a fixed order."""

    role: str
    blocks: list[tuple[str, torch.nn.Module, Any]]  # (name, module, ResidualBlock or None)
    names: list[str] = field(default_factory=list)  # layer names in the order of the first batch
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    last_out: object = None
    inputs: dict[str, str] = field(default_factory=dict)  # block name -> the layer that is its input

    def pre(self, name, module, inputs) -> None:
        x = inputs[0]
        if self.last_out is not None and x is self.last_out:
            self.inputs[name] = self._prev
        else:
            label = "stem" if name == self.blocks[0][0] else f"{name} input"
            self._put(label, x)
            self.inputs[name] = label
        block = self._block[name]
        if block is not None and self.branches:
            self._put(f"{name} F(x)", block.branch(x))

    def post(self, name, module, inputs, output) -> None:
        self._put(name, output)
        self.last_out, self._prev = output, name

    def _put(self, label: str, t: torch.Tensor) -> None:
        if label not in self.names:
            self.names.append(label)
        self.grams[label] = u_centred_gram(t)

    def start(self, branches: bool) -> None:
        self.branches = branches
        self._block = {n: b for n, _, b in self.blocks}
        self.grams, self.last_out, self._prev = {}, None, None


@dataclass
class Measured:
    """Every layer ``(role, name)`` in a fixed order, the CKA matrix over them, the HSIC sums, each network's
    map from block name to the layer that is its input, and how many images were left out (batches < 4)."""

    order: list[tuple[str, str]]
    cka: torch.Tensor
    sums: HSICSums
    inputs: dict[str, dict[str, str]]
    skipped: int


def units(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A network without residual blocks (a plain twin on its own, a plain user model) is compared unit by
    unit: the elements of its outermost ``nn.Sequential`` containers that hold parameters (``layer1.0``, …),
    in module order."""
    out: list[tuple[str, torch.nn.Module]] = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Sequential) and not any(name.startswith(f"{u}.") or name == u for u, _ in out):
            out += [
                (f"{name}.{c}" if name else c, child)
                for c, child in m.named_children()
                if any(True for _ in child.parameters())
            ]
    return out


def _networks(ctx) -> list[_Net]:
    blocks = ctx.blocks("model")
    nets = [
        _Net(
            "model", [(b.name, b.module, b) for b in blocks] if blocks else [(n, m, None) for n, m in units(ctx.model)]
        )
    ]
    if ctx.twin is not None:
        pairs = [(b.name, m, None) for b, m in ctx.twin_counterparts() if m is not None]
        if pairs:
            nets.append(_Net("twin", pairs))
    return nets


def measure(ctx, images: int, branches: bool) -> Measured:
    """Run the test images through the networks once, all layers' Gram matrices per batch, one HSIC product."""
    nets = _networks(ctx)
    sums: Any = None
    order: list[tuple[str, str]] | None = None
    skipped = 0
    with torch.inference_mode():
        for x, _ in ctx.shard(ctx.progress(ctx.test_batches(images), desc="similarity: CKA batches"), whole=True):
            if len(x) < MIN_BATCH:
                skipped += len(x)
                continue
            if x.dim() == 4:  # convolutions run faster on channels-last inputs; the Gram matrices do not care
                x = x.contiguous(memory_format=torch.channels_last)
            for net in nets:
                model = ctx.model if net.role == "model" else ctx.twin
                net.start(branches)
                mods = [(n, m) for n, m, _ in net.blocks]
                with eval_mode(model), on_forward(mods, net.pre, before=True), on_forward(mods, net.post):
                    model(x)
            if order is None:
                order = [(net.role, n) for net in nets for n in net.names]
                sums = HSICSums(len(order), device=x.device)
            grams = {(net.role, n): g for net in nets for n, g in net.grams.items()}
            sums.add([grams[k] for k in order])
    # under torchrun: every rank's HSIC sums and counts added up (labels such as the layer order are kept)
    inputs = {net.role: dict(net.inputs) for net in nets}
    got = ctx.all_reduce({"order": order, "sums": sums, "skipped": skipped, "inputs": inputs})
    order, sums, skipped, inputs = got["order"], got["sums"], got["skipped"], got["inputs"]
    if sums is None:
        raise ValueError(f"no test batch of at least {MIN_BATCH} images to compare layers on")
    return Measured(order, sums.cka().cpu(), sums, inputs, skipped)


@hookimpl
def resinspect_estimate(ctx) -> float:
    """One forward pass of the images through each network; the Gram matrices add about a third."""
    images = ctx.test_images(ctx.options()["images"])
    return 1.3 * float(ctx.multiply_adds()) * images * len(ctx.networks())


@hookimpl(trylast=True)  # after ablation, whose lesion costs it sets beside its own numbers
def resinspect_analyze(ctx):
    opts = ctx.options()
    s = Section(
        title="Representation similarity (CKA) between blocks", explanation=EXPLANATION, docs="explainer-similarity"
    )
    s.key_metrics = ["median_cka_in_out", "twin_median_cka_in_out", "block_structure_runs"]
    blocks = [name for name, _, _ in _networks(ctx)[0].blocks]
    if len(blocks) < 2:
        s.finding(f"{ctx.model_name} has neither residual blocks nor sequential stages to compare.", "warning")
        return s
    r = measure(ctx, opts["images"], opts["branches"])
    order, cka, inputs = r.order, r.cka, r.inputs
    index = {k: i for i, k in enumerate(order)}
    s.metrics["images"], s.metrics["batches"] = r.sums.images, r.sums.batches
    if r.skipped:
        s.metrics["images_skipped"] = r.skipped
    # the heatmap's layers: the stem and the block outputs (not the branches, nor block inputs that are no
    # other layer's output)
    heat = {
        role: [k for k in order if k[0] == role and not k[1].endswith((" F(x)", " input"))]
        for role in ("model", "twin")
        if any(k[0] == role for k in order)
    }
    within = _within(blocks, inputs["model"], index, cka, opts["branches"])
    for name, v in within.items():
        s.metrics[f"block/{name}/cka_in_out"] = v["in_out"]
        if "in_branch" in v:
            s.metrics[f"block/{name}/cka_in_branch"] = v["in_branch"]
    if ctx.blocks("model"):  # (a plain network's units are not residual blocks: no dossier column)
        s.block_column("CKA(input, output)", {n: v["in_out"] for n, v in within.items()}, matters_more_when="smaller")
    twin_within = _within_twin(inputs.get("twin", {}), index, cka) if "twin" in heat else {}
    for name, twin_value in twin_within.items():
        s.metrics[f"twin/block/{name}/cka_in_out"] = twin_value
    _structure(s, ctx, heat["model"], index, cka, opts["structure_threshold"])
    _changed(s, ctx, within, twin_within)
    _lesion_correlation(s, ctx, within)
    _tables(s, ctx, within, twin_within, heat, index, cka)
    _figures(s, ctx, heat, index, cka, within, twin_within)
    return s


def _within(
    blocks: list[str], inputs: dict, index: dict, cka: torch.Tensor, branches: bool
) -> dict[str, dict[str, float]]:
    out = {}
    for name in blocks:
        i, o = index[("model", inputs[name])], index[("model", name)]
        v = {"in_out": float(cka[i, o])}
        if branches and ("model", f"{name} F(x)") in index:
            v["in_branch"] = float(cka[i, index[("model", f"{name} F(x)")]])
        out[name] = v
    return out


def _within_twin(inputs: dict, index: dict, cka: torch.Tensor) -> dict[str, float]:
    return {name: float(cka[index[("twin", src)], index[("twin", name)]]) for name, src in inputs.items()}


def block_structure(cka: np.ndarray, threshold: float, min_layers: int = 3) -> list[tuple[int, int]]:
    """Maximal runs ``(first, last)`` of at least ``min_layers`` consecutive layers whose CKA with each other
    is above ``threshold``, every pair of the run (a bright square on the heatmap's diagonal)."""
    runs, a, n = [], 0, len(cka)
    while a < n:
        b = a
        while b + 1 < n and (cka[a : b + 1, b + 1] > threshold).all():
            b += 1
        if b - a + 1 >= min_layers:
            runs.append((a, b))
            a = b + 1
        else:
            a += 1
    return runs


def _structure(s: Section, ctx, layers: list, index: dict, cka: torch.Tensor, threshold: float) -> None:
    names = [n for _, n in layers]
    idx = [index[k] for k in layers]
    runs = block_structure(cka[idx][:, idx].numpy(), threshold)
    s.metrics["block_structure_runs"] = len(runs)
    s.metrics["block_structure_layers"] = sum(b - a + 1 for a, b in runs)
    if runs:
        text = "; ".join(f"{names[a]} … {names[b]} ({b - a + 1} layers)" for a, b in runs)
        s.finding(
            f"Block structure in {ctx.model_name}: runs of consecutive layers whose outputs all have CKA "
            f"above {threshold:g} with each other: {text}. The blocks inside such a run barely change the "
            "representation: candidates for removal (check their lesion cost).",
            "warning",
        )
    else:
        s.finding(
            f"No block structure in {ctx.model_name}: no three consecutive layers have CKA above "
            f"{threshold:g} with each other (Nguyen et al. see it in much deeper or wider networks).",
            "info",
        )


def _changed(s: Section, ctx, within: dict, twin_within: dict) -> None:
    ranked = sorted(within.items(), key=lambda kv: kv[1]["in_out"])
    most, least = ranked[0], ranked[-1]
    s.metrics["median_cka_in_out"] = float(np.median([v["in_out"] for v in within.values()]))
    s.finding(
        f"The block that changes the representation most is {most[0]} (CKA between its input and output "
        f"{most[1]['in_out']:.3f}); the one that changes it least is {least[0]} ({least[1]['in_out']:.3f})."
    )
    if twin_within:
        shared = [n for n in within if n in twin_within]
        m = float(np.median([within[n]["in_out"] for n in shared]))
        t = float(np.median([twin_within[n] for n in shared]))
        s.metrics["twin_median_cka_in_out"] = t
        kept = m > t
        s.finding(
            f"Median CKA between a block's input and output: {m:.3f} in {ctx.model_name}, {t:.3f} in the plain "
            f"twin {ctx.label('twin')}: "
            + (
                "the residual blocks preserve their input more, as adding F(x) to x predicts."
                if kept
                else "the residual blocks do not preserve their input more here."
            ),
            "good" if kept else "info",
        )


def _spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _lesion_correlation(s: Section, ctx, within: dict) -> None:
    ablation = ctx.section("ablation")
    if ablation is None:
        return
    pairs = [(1 - v["in_out"], ablation.metrics.get(f"lesion/{name}/cost_points")) for name, v in within.items()]
    pairs = [(c, cost) for c, cost in pairs if cost is not None]
    if len(pairs) < 3:
        return
    rho = _spearman([c for c, _ in pairs], [cost for _, cost in pairs])
    s.metrics["spearman_change_vs_lesion_cost"] = rho
    agree = rho > 0.3
    s.finding(
        f"Rank correlation between how much a block changes the representation (1 − CKA(input, output)) and "
        f"its lesion cost from ablation: {rho:+.2f} over {len(pairs)} blocks: "
        + (
            "blocks that change the representation little are cheap to remove, as expected."
            if agree
            else "how much a block changes the representation does not predict what removing it costs here."
        ),
        "good" if agree else "info",
    )


def _tables(s: Section, ctx, within: dict, twin_within: dict, heat: dict, index: dict, cka: torch.Tensor) -> None:
    ablation = ctx.section("ablation")
    cols = ["block", "CKA(input, output)", "CKA(input, F(x))"]
    if twin_within:
        cols.append("plain twin: CKA(input, output)")
    if ablation is not None:
        cols.append("lesion cost (points)")
    rows = []
    for name, v in within.items():
        row = [name, v["in_out"], v.get("in_branch")]
        if twin_within:
            row.append(twin_within.get(name))
        if ablation is not None:
            row.append(ablation.metrics.get(f"lesion/{name}/cost_points"))
        rows.append(row)
    s.table(
        "How much each block changes its input",
        cols,
        rows,
        caption="CKA 1: the output is a rotation or rescaling of the input; lower: the block changed the "
        "representation more.",
    )
    layers = heat["model"]
    s.table(
        f"CKA between block outputs: {ctx.model_name}",
        ["layer"] + [n for _, n in layers],
        [[a[1]] + [float(cka[index[a], index[b]]) for b in layers] for a in layers],
    )


def _figures(s: Section, ctx, heat: dict, index: dict, cka: torch.Tensor, within: dict, twin_within: dict) -> None:
    plt = pyplot()
    panels = [(ctx.label(role), layers, layers) for role, layers in heat.items()]
    if "twin" in heat:
        panels.append((f"{ctx.model_name} vs {ctx.label('twin')}", heat["model"], heat["twin"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (title, rows, cols) in zip(axes[0], panels):
        m = np.array([[float(cka[index[a], index[b]]) for b in cols] for a in rows])
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest")
        ax.set(
            title=title,
            xlabel="layer" if cols is rows else f"{ctx.label('twin')} layer",
            ylabel="layer" if cols is rows else f"{ctx.model_name} layer",
        )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="CKA")
    s.figure(
        fig,
        "CKA between layers",
        "Linear CKA (unbiased minibatch estimator) between the stem and every "
        "block output, 0 at the bottom left; bright squares along the diagonal are block structure. The "
        "same colour scale in every panel.",
    )
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = list(within)
    x = np.arange(len(names))
    ax.plot(x, [within[n]["in_out"] for n in names], "o-", ms=3, label=f"{ctx.model_name}: CKA(input, output)")
    if any("in_branch" in v for v in within.values()):
        ax.plot(
            x,
            [within[n].get("in_branch", np.nan) for n in names],
            "^:",
            ms=3,
            label=f"{ctx.model_name}: CKA(input, F(x))",
        )
    if twin_within:
        ax.plot(
            x,
            [twin_within.get(n, np.nan) for n in names],
            "s--",
            ms=3,
            label=f"{ctx.label('twin')}: CKA(input, output)",
        )
    ax.set(xlabel="block", ylabel="CKA", ylim=(min(0, ax.get_ylim()[0]), 1.05), title="What each block changes")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    s.figure(
        fig,
        "Within-block similarity over depth",
        "For each block, CKA between its input and its output "
        "(high: the block changed little) and between its input and its branch F(x).",
    )
