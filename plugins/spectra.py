"""Heavy-tailed self-regularisation per layer (Martin & Mahoney 2021): the weight matrices' eigenvalue
spectra, their power-law exponent alpha and norms, as WeightWatcher computes them; residual against plain,
at initialisation and trained."""

from __future__ import annotations

import math

import numpy as np
import torch

from resinspect import Section, hookimpl, is_conv, is_linear, linear_weight, pyplot, svd_multiply_adds
from resinspect_plugins._spectra import LayerSpectrum, spectrum

NAME = "spectra"

EXPLANATION = """\
Martin and Mahoney (2021) read a trained layer's quality off the spectrum of its weight matrix W: the \
eigenvalues of WᵀW (the squared singular values). A random matrix gives the Marchenko–Pastur bulk, with a \
thin tail; training that learns correlations grows a heavy, power-law tail p(λ) ∝ λ^(−α). The exponent α of \
that tail, fitted per layer, is the central number: the smaller, the heavier the tail and the more \
correlation the layer has absorbed. WeightWatcher's published guidance reads α of about 2 to 6 as a well \
trained layer, well above 6 as barely trained (the spectrum is still close to random), and below 2 as \
possibly over-fit or over-regularised. They are tendencies seen across many published models, not verdicts \
about one layer.

The numbers are computed as WeightWatcher computes them, so they compare: a k×k convolution gives k² matrices \
(one per kernel position, W[:, :, i, j]), each scaled by 1/√2, their eigenvalues pooled into one spectrum; \
α is the maximum-likelihood exponent of the tail λ ≥ λ_min, with λ_min chosen among the eigenvalues by the \
smallest Kolmogorov–Smirnov distance (Clauset et al. 2009). Also: the stable rank Σλ/λ_max (how many \
directions carry the weight's energy), the spectral norm λ_max and its log10, and α-weighted = α·log10 λ_max. \
Layers with fewer than 8 eigenvalues are left out, as WeightWatcher leaves them out.

A residual connection changes what a layer has to learn: the block adds a correction F(x) to x rather than \
producing the whole mapping, so its layers can stay closer to their initialisation (higher α) than the plain \
twin's, whose every layer carries the full signal. Whether that shows on your model is what the comparison \
by depth below says."""


@hookimpl
def resinspect_addoptions(options):
    options.add("at_init", bool, True, "also analyse the weights at initialisation")
    options.add(
        "min_evals",
        int,
        8,
        "leave out layers with fewer eigenvalues (WeightWatcher's min_evals)",
        bounds="[2, 1_000_000]",
    )
    options.add(
        "precision",
        str,
        "float32",
        "arithmetic of the eigenvalue computation (float32: eigenvalues to "
        "about 1e-6 of the largest, four times faster on a CPU; float64: to 1e-14)",
        choices=["float32", "float64"],
    )
    options.add(
        "max_evals",
        int,
        15000,
        "leave out layers with more eigenvalues (WeightWatcher's max_evals)",
        bounds="[2, 100_000_000]",
    )


def layers_of(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The convolution and linear layers WeightWatcher analyses, in module order."""
    return [
        (n, m)
        for n, m in net.named_modules()
        if (is_conv(m) or is_linear(m)) and getattr(m, "weight", None) is not None and m.weight.dim() >= 2
    ]


def analyse(
    net: torch.nn.Module,
    min_evals: int = 8,
    max_evals: int = 15000,
    state: dict[str, torch.Tensor] | None = None,
    precision: str = "float32",
) -> tuple[list[LayerSpectrum], list[tuple[str, str]]]:
    """Spectra of every layer of ``net`` (with the weights of ``state`` when given); also the layers left out
    and why."""
    out, skipped = [], []
    for name, module in layers_of(net):
        weight = linear_weight(module, None if state is None else state[f"{name}.weight"])
        sp, why = spectrum(name, weight, min_evals, max_evals, getattr(torch, precision))
        if sp is None:
            skipped.append((name, why))
        else:
            out.append(sp)
    return out, skipped


@hookimpl
def resinspect_estimate(ctx) -> float:
    """The singular values of every layer of each network, trained and at initialisation."""
    opts = ctx.options()
    total = 0.0
    for role, net in ctx.networks():
        states = 2 if opts["at_init"] and ctx.initial_state.get(role) is not None else 1
        weights = [linear_weight(m) for _, m in layers_of(net)]
        shapes = [tuple(int(d) for d in w.shape) for w in weights]
        total += states * sum(svd_multiply_adds(shape) for shape in shapes)
    return total


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()
    s = Section(
        title="Weight spectra: heavy-tailed self-regularisation", explanation=EXPLANATION, docs="explainer-spectra"
    )
    s.key_metrics = ["model/trained/median_alpha"]
    results: dict[tuple[str, str], list[LayerSpectrum]] = {}
    skipped: list[tuple[str, str]] = []
    for role, net in ctx.networks():
        results[(role, "trained")], left = analyse(
            net, opts["min_evals"], opts["max_evals"], precision=opts["precision"]
        )
        skipped += [(ctx.label(role), f"{n}: {why}") for n, why in left]
        init = ctx.initial_state.get(role)
        if opts["at_init"] and init is not None:
            results[(role, "init")], _ = analyse(net, opts["min_evals"], opts["max_evals"], init, opts["precision"])
    _metrics(s, ctx, results)
    _block_column(s, ctx, results.get(("model", "trained"), []))
    _tables(s, ctx, results, skipped)
    _findings(s, ctx, results)
    _figures(s, ctx, results)
    return s


def _summary(layers: list[LayerSpectrum]) -> dict[str, float]:
    alphas = np.array([sp.alpha for sp in layers if sp.fit is not None])
    return {
        "mean_alpha": float(alphas.mean()) if len(alphas) else float("nan"),
        "median_alpha": float(np.median(alphas)) if len(alphas) else float("nan"),
        "mean_alpha_weighted": float(np.mean([sp.alpha_weighted for sp in layers if sp.fit is not None]))
        if len(alphas)
        else float("nan"),
        "mean_log_spectral_norm": float(np.mean([sp.log_spectral_norm for sp in layers])) if layers else float("nan"),
        "mean_stable_rank": float(np.mean([sp.stable_rank for sp in layers])) if layers else float("nan"),
        "layers_alpha_above_6": int((alphas > 6).sum()),
        "layers_alpha_below_2": int((alphas < 2).sum()),
        "layers": len(layers),
    }


def _block_column(s: Section, ctx, layers: list[LayerSpectrum]) -> None:
    """The dossier's column: the median alpha of each residual block's fitted layers (lower: more structure)."""
    per = {}
    for b in ctx.blocks("model"):
        alphas = [sp.alpha for sp in layers if sp.fit is not None and sp.name.startswith(b.name + ".")]
        if alphas:
            per[b.name] = float(np.median(alphas))
    if per:
        s.block_column("median alpha", per, matters_more_when="smaller")


def _metrics(s: Section, ctx, results: dict) -> None:
    for (role, state), layers in results.items():
        for k, v in _summary(layers).items():
            s.metrics[f"{role}/{state}/{k}"] = v
        if state == "trained":
            ctx.log_scalars({f"alpha/{sp.name}": sp.alpha for sp in layers if sp.fit is not None}, 0, role=role)
            ctx.log_scalars({f"stable_rank/{sp.name}": sp.stable_rank for sp in layers}, 0, role=role)


def _tables(s: Section, ctx, results: dict, skipped: list) -> None:
    for (role, state), layers in results.items():
        if state != "trained":
            continue
        init = {sp.name: sp for sp in results.get((role, "init"), [])}
        s.table(
            f"Layer spectra: {ctx.label(role)}",
            [
                "layer",
                "kind",
                "N×M × matrices",
                "eigenvalues",
                "alpha",
                "alpha at init",
                "λ_min of the fit",
                "KS distance",
                "stable rank",
                "spectral norm",
                "log10 spectral norm",
                "alpha weighted",
            ],
            [
                [
                    sp.name,
                    sp.kind,
                    f"{sp.N}×{sp.M} × {sp.rf}",
                    sp.num_evals,
                    sp.alpha,
                    init[sp.name].alpha if sp.name in init else None,
                    sp.fit.xmin if sp.fit else None,
                    sp.fit.D if sp.fit else None,
                    sp.stable_rank,
                    sp.spectral_norm,
                    sp.log_spectral_norm,
                    sp.alpha_weighted,
                ]
                for sp in layers
            ],
            caption="Columns as WeightWatcher names them; convolutions pool the spectra of their k² kernel positions.",
        )
    if skipped:
        s.table(
            "Layers left out",
            ["network", "layer"],
            [list(r) for r in skipped],
            caption="WeightWatcher's size rules (options min_evals, max_evals).",
        )


def _thirds(layers: list[LayerSpectrum]) -> list[float]:
    alphas = [sp.alpha for sp in layers if sp.fit is not None]
    parts = np.array_split(np.array(alphas), 3) if len(alphas) >= 3 else [np.array(alphas)]
    return [float(np.median(p)) if len(p) else float("nan") for p in parts]  # medians: a few fits run off to 40


def _findings(s: Section, ctx, results: dict) -> None:
    layers = results[("model", "trained")]
    summ = _summary(layers)
    high = [sp.name for sp in layers if sp.fit is not None and sp.alpha > 6]
    low = [sp.name for sp in layers if sp.fit is not None and sp.alpha < 2]
    s.finding(
        f"{ctx.model_name}: median alpha {summ['median_alpha']:.2f} over {summ['layers']} layers; "
        f"{len(high)} above 6 (tend to be barely trained, spectrum still close to random)"
        + (f", e.g. {', '.join(high[:3])}" if high else "")
        + f"; {len(low)} below 2 (tend to be over-fit or over-regularised)"
        + (f", e.g. {', '.join(low[:3])}" if low else "")
        + ".",
        "warning" if len(high) > len(layers) / 2 else "info",
    )
    if ("model", "init") in results:
        before = _summary(results[("model", "init")])["median_alpha"]
        moved = summ["median_alpha"] < before - 0.25
        s.finding(
            f"Training moved the median alpha of {ctx.model_name} from {before:.2f} at initialisation to "
            f"{summ['median_alpha']:.2f}: "
            + (
                "the spectra grew heavier tails, as learned correlations do."
                if moved
                else "the spectra barely changed from random (short training leaves them near initialisation)."
            ),
            "good" if moved else "info",
        )
    if ("twin", "trained") in results:
        _twin_finding(s, ctx, results)


def _shared(results: dict, state: str) -> tuple[list[LayerSpectrum], list[LayerSpectrum]]:
    """The layers of model and twin with the same name (the twin has no projection shortcuts), in order."""
    twin = {sp.name: sp for sp in results.get(("twin", state), [])}
    pairs = [(sp, twin[sp.name]) for sp in results.get(("model", state), []) if sp.name in twin]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _twin_finding(s: Section, ctx, results: dict) -> None:
    m, t = _shared(results, "trained")
    mt, tt = _thirds(m), _thirds(t)
    parts = ", ".join(
        f"{name} {a:.2f} vs {b:.2f}" for name, a, b in zip(("first third", "middle", "last third"), mt, tt)
    )
    text = (
        f"Median alpha by depth over the {len(m)} layers both networks have, {ctx.model_name} vs plain twin "
        f"{ctx.label('twin')}, trained: {parts}."
    )
    if ("model", "init") in results and ("twin", "init") in results:
        mi, ti = _shared(results, "init")
        dm = float(np.nanmedian([a.alpha - b.alpha for a, b in zip(m, mi)]))
        dt = float(np.nanmedian([a.alpha - b.alpha for a, b in zip(t, ti)]))
        s.metrics["model/median_alpha_change"], s.metrics["twin/median_alpha_change"] = dm, dt
        same = all(
            torch.equal(ctx.initial_state["model"][f"{a.name}.weight"], ctx.initial_state["twin"][f"{b.name}.weight"])
            for a, b in zip(m, t)
        )
        text += (
            f" From {'the same' if same else 'their own random'} initial weights training changed alpha by a "
            f"median of {dm:+.2f} per layer in {ctx.model_name} and {dt:+.2f} in the plain twin: "
        )
        if max(abs(dm), abs(dt)) < 0.5:
            text += (
                "neither network's spectra moved far from random, so the contrast by depth is that of the "
                "initial weights (a random matrix's fitted alpha scatters widely), not of training."
            )
        else:
            text += (
                "the residual layers moved less from random, each block learning a correction rather than "
                "the whole map."
                if abs(dm) < abs(dt)
                else "the residual layers moved at least as far from random as the plain ones."
            )
    s.finding(text, "info")


def _figures(s: Section, ctx, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    order = {sp.name: i for i, sp in enumerate(results[("model", "trained")])}
    for (role, state), layers in results.items():
        pts = [(order.get(sp.name, i), sp.alpha) for i, sp in enumerate(layers) if sp.fit is not None]
        if role == "twin":  # the twin has no projection shortcuts: place its layers by name where it can
            pts = [(order[sp.name], sp.alpha) for sp in layers if sp.fit is not None and sp.name in order]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(
            xs,
            ys,
            ("o-" if role == "model" else "s--"),
            ms=3,
            lw=1,
            alpha=1.0 if state == "trained" else 0.45,
            label=f"{ctx.label(role)}, {state}",
        )
    ax.axhspan(2, 6, color="g", alpha=0.08, lw=0)
    ax.set(xlabel="layer (module order)", ylabel="alpha", title="Power-law exponent by depth", yscale="log")
    ax.legend(fontsize=8)
    s.figure(
        fig,
        "Alpha by depth",
        "The fitted power-law exponent of each layer's spectrum; shaded: 2 ≤ α ≤ 6, "
        "WeightWatcher's range for well-trained layers.",
    )
    layers = [sp for sp in results[("model", "trained")] if sp.fit is not None]
    if not layers:
        return
    picks = [min(layers, key=lambda sp: sp.alpha), max(layers, key=lambda sp: sp.alpha)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, sp in zip(axes, picks):
        ev = sp.evals.numpy()
        ev = ev[ev > 0]
        bins = np.logspace(math.log10(ev.min()), math.log10(ev.max()), 40)
        ax.hist(ev, bins=bins, density=True, alpha=0.6)
        x = np.logspace(math.log10(sp.fit.xmin), math.log10(ev.max()), 50)
        tail = sp.fit.n_tail / len(ev)
        ax.plot(
            x,
            tail * (sp.alpha - 1) / sp.fit.xmin * (x / sp.fit.xmin) ** (-sp.alpha),
            "r--",
            label=f"α = {sp.alpha:.2f}",
        )
        ax.set(xscale="log", yscale="log", xlabel="eigenvalue λ", ylabel="density", title=sp.name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    s.figure(
        fig,
        "Spectral densities",
        f"The empirical spectral density of the layers of {ctx.model_name} with the "
        "smallest and the largest alpha (log–log), with the fitted power-law tail.",
    )
