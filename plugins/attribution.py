"""Attribution maps through captum, scored for faithfulness (deletion/insertion), localisation (on ``shapes``)
and sanity (Adebayo et al. 2018: do the maps change when the model is randomised?)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from resinspect import Section, eval_mode, hookimpl, is_batchnorm, pyplot, residual_blocks
from resinspect_plugins._attribution_methods import METHODS, attribute, method_names
from resinspect_plugins._attribution_scores import deletion_insertion, mask_share, pointing_game, spearman
from resinspect_plugins._token_attribution import deletion_drop, embedding_layer, target_logprob, token_attributions

NAME = "attribution"
DEFAULT_METHODS = ["saliency", "integrated_gradients", "smoothgrad", "occlusion", "gradcam", "attention_rollout"]

EXPLANATION = """\
Attribution maps say which input pixels a prediction depends on, for the predicted class. They are computed \
with captum: Saliency (|gradient|), Integrated Gradients (path integral from a zero baseline), SmoothGrad \
(saliency averaged over noisy copies), GradientShap, Occlusion (the drop in the class score when a patch is \
hidden) and GradCAM at the output of each residual stage, upsampled to the input.

A map is only worth showing if it can be trusted, so each method is scored. Faithfulness: the deletion curve \
removes pixels in order of attribution and tracks the class probability (a faithful map makes it fall fast: \
low area under the curve); the insertion curve reveals them on a blank image (high area is good); both are \
compared with a random pixel order. Localisation (only on the shapes dataset, whose object masks are known): \
the pointing game (is the top pixel on the object?) and the share of positive attribution inside the mask. \
Sanity (Adebayo et al. 2018): the model's head and residual blocks are re-initialised cumulatively from the \
output backwards, and the Spearman rank correlation between each new map and the original is tracked; a \
method whose maps barely change does not reflect what the model learned."""


@hookimpl
def resinspect_addoptions(options):
    options.add(
        "methods",
        list,
        DEFAULT_METHODS,
        "attribution methods to run (gradcam: one map per residual stage; attention_rollout: only for models "
        "with self-attention)",
        choices=list(METHODS),
        check=lambda v: "name at least one method" if not v else None,
    )
    options.add("images", int, 32, "test images to attribute and score", bounds="[1, 4096]")
    options.add("ig_steps", int, 32, "Integrated Gradients steps (and GradientShap samples)", bounds="[2, 1024]")
    options.add("internal_batch_size", int, 256, "images per forward pass inside captum", bounds="[1, 65536]")
    options.add("smoothgrad_samples", int, 16, "noisy samples per image for SmoothGrad", bounds="[1, 1024]")
    options.add(
        "smoothgrad_std", float, 0.15, "noise std for SmoothGrad / GradientShap (input units)", bounds="[0, 1000]"
    )
    options.add(
        "occlusion_window", int, 0, "occlusion patch size in pixels (0: a quarter of the image)", bounds="[0, 4096]"
    )
    options.add("curve_steps", int, 20, "steps of the deletion/insertion curves", bounds="[2, 1000]")
    options.add("sanity", bool, True, "run the cascading-randomisation sanity check")
    options.add("sanity_images", int, 8, "images used by the sanity check", bounds="[1, 1024]")
    options.add(
        "sanity_threshold",
        float,
        0.5,
        "a method fails the sanity check if its maps still correlate "
        "above this (Spearman) with the original after full randomisation",
        bounds="(-1, 1)",
    )


def _images(ctx, n: int):
    xs, ys = [], []
    for x, y in ctx.test_batches(n):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    masks = ctx.data.test_masks[: len(y)].to(ctx.device) if ctx.data.test_masks is not None else None
    return x, y, masks


def _passes(key: str, opts, size: tuple[int, int]) -> float:
    """Forward-pass equivalents per image a method makes (a backward counts as two forwards): to balance the
    ranks' shares and to fit the study to the compute budget."""
    if key in ("integrated_gradients", "gradient_shap"):
        return 3.0 * opts["ig_steps"]
    if key == "smoothgrad":
        return 3.0 * opts["smoothgrad_samples"]
    if key == "occlusion":
        w = max(2, opts["occlusion_window"] or size[-1] // 4)
        stride = max(1, w // 2)
        return 1.0 + ((size[-1] - w) // stride + 1) * ((size[-2] - w) // stride + 1)
    if key == "attention_rollout":
        return 1.0
    return 4.0 if key == "gradcam" else 3.0  # gradcam: a probe forward, then forward and backward


def _maps(model, methods, x, target, opts, ctx=None, seed: int = 0, desc: str | None = None) -> dict[str, torch.Tensor]:
    """Every method's maps, each drawn with its own random stream (``seed`` + its index: the same numbers
    whichever process computes it). Under torchrun (``ctx``) the methods are split across the ranks and the
    maps gathered."""
    indexed = list(enumerate(methods))
    mine = ctx.split(indexed, cost=lambda item: _passes(item[1][1], opts, x.shape[-2:])) if ctx is not None else indexed
    if ctx is not None and desc:
        mine = ctx.progress(mine, desc=desc)
    out = {}
    for i, (name, key, stage) in mine:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            out[name] = attribute(model, key, x, target, opts, stage)
    if ctx is not None and ctx.world_size > 1:
        gathered = {k: v for part in ctx.all_gather(out) for k, v in part.items()}
        out = {name: gathered[name] for name, _, _ in methods}
    return out


@hookimpl
def resinspect_analyze(ctx) -> Section:
    opts = ctx.options(NAME)
    s = Section(title="Attribution maps, scored", explanation=EXPLANATION, docs="explainer-sanity")
    s.key_metrics = ["integrated_gradients/deletion_auc", "saliency/deletion_auc"]
    if ctx.task.is_language:
        if embedding_layer(ctx.model) is None:
            return s.skip(f"{ctx.model_name} reads token ids without an nn.Embedding to attribute through")
        s.key_metrics = ["integrated_gradients/drop_top1", "feature_ablation/drop_top1"]
        with eval_mode(ctx.model):
            return _tokens(ctx, ctx.model, opts, s)
    with eval_mode(ctx.model):
        return _analyze(ctx, ctx.model, opts, s)


TOKEN_EXPLANATION = """\
For a language model the prediction explained is the log-probability the model gives the true next token at \
the last position of each test sequence, attributed to the input tokens with captum: integrated gradients on \
the token embeddings (LayerIntegratedGradients; baseline token 0 at every position; a position's attribution is \
the sum over its embedding; the attributions of a sequence add up to f(input) − f(baseline)) and feature \
ablation (FeatureAblation: each position replaced by token 0 in turn; the attribution is the drop in \
log-probability). Faithfulness: replacing the 1 or 3 most attributed tokens by token 0 should lower the \
log-probability more than replacing 3 random ones. On induction data the answer is a copy of an earlier token: \
the table says how often the most attributed token is an earlier copy of the answer, or the current token (the \
query an induction head matches against its earlier occurrence)."""


def _tokens(ctx, model, opts: dict[str, Any], s: Section) -> Section:
    """Token attribution of a language model's last-position prediction (see :data:`TOKEN_EXPLANATION`)."""
    s.explanation = TOKEN_EXPLANATION
    n, plan = token_plan(ctx, opts)
    said = plan.finding(ctx.multiply_adds(), 1)
    if said:
        s.finding(said, "info")
    batches = list(ctx.test_batches(n))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    target = y[:, -1]
    found: dict[str, list[torch.Tensor]] = {}
    chunk = max(1, 256 // opts["ig_steps"])
    for i in ctx.progress(range(0, len(x), chunk), desc="token attribution"):
        for k, v in token_attributions(model, x[i : i + chunk], target[i : i + chunk], opts["ig_steps"]).items():
            found.setdefault(k, []).append(v)
    maps = {k: torch.cat(v) for k, v in found.items()}
    gen = torch.Generator().manual_seed(ctx.seed)
    maps_random = torch.rand(x.shape, generator=gen).to(x.device)
    periods = ctx.data.info.get("test_periods")
    induction = ctx.data.name == "induction" and bool(periods)
    rows = []
    with torch.no_grad():  # the intact log-probabilities, once for every method and k
        clean = target_logprob(model, target)(x)
    for name, scores in [*maps.items(), ("random", maps_random)]:
        top1 = float(deletion_drop(model, x, target, scores, 1, clean).mean())
        top3 = float(deletion_drop(model, x, target, scores, 3, clean).mean())
        s.metrics[f"{name}/drop_top1"], s.metrics[f"{name}/drop_top3"] = top1, top3
        copy = current = None
        if induction and name != "random":
            top = scores.argmax(1)
            current = float((top == x.shape[1] - 1).float().mean())
            copy = float(((x.gather(1, top[:, None]).squeeze(1) == target) & (top != x.shape[1] - 1)).float().mean())
            s.metrics[f"{name}/top_is_copy"], s.metrics[f"{name}/top_is_current"] = copy, current
        rows.append([name.replace("_", " "), top1, top3, copy, current])
    s.metrics["sequences"] = len(x)
    s.table(
        f"Faithfulness on {len(x)} test sequences: log-probability drop when the most attributed tokens are "
        "replaced by token 0",
        [
            "method",
            "drop, top 1 (nats)",
            "drop, top 3 (nats)",
            "top: an earlier copy of the answer",
            "top: current token",
        ],
        rows,
    )
    _token_findings(s, maps, induction, x.shape[1])
    _token_figure(s, maps, x)
    return s


def _token_findings(s: Section, maps: dict, induction: bool, length: int) -> None:
    m = s.metrics
    rand = m["random/drop_top3"]
    parts = [f"{k.replace('_', ' ')} {m[f'{k}/drop_top3']:.2f}" for k in maps]
    better = all(m[f"{k}/drop_top3"] > rand for k in maps)
    s.finding(
        f"Replacing the 3 most attributed tokens lowers the answer's log-probability by {', '.join(parts)} nats, "
        f"3 random tokens by {rand:.2f}: "
        + (
            "both attributions find tokens the prediction depends on."
            if better
            else "not every method beats random here."
        )
    )
    if induction:
        said = ", ".join(
            f"{k.replace('_', ' ')} {m[f'{k}/top_is_copy']:.0%} / {m[f'{k}/top_is_current']:.0%}" for k in maps
        )
        s.finding(
            "The most attributed token is an earlier copy of the answer / the current token in "
            + said
            + f" of the sequences (chance about {1 / length:.0%} for one position)."
        )


def _token_figure(s: Section, maps: dict, x: torch.Tensor) -> None:
    plt = pyplot()
    rows = min(8, len(x))
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 0.3 * rows + 1.6), squeeze=False)
    for ax, (name, a) in zip(axes[0], maps.items()):
        part = a[:rows].float().cpu()
        part = part / part.abs().amax(1, keepdim=True).clamp_min(1e-12)
        ax.imshow(part.numpy(), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set(xlabel="position", ylabel="sequence", title=name.replace("_", " "))
    fig.tight_layout()
    s.figure(
        fig,
        "Token attributions",
        "Each row a test sequence (scaled to its largest attribution); red: raises "
        "the log-probability of the answer at the last position, blue: lowers it.",
    )


# captum's internal batches hold a forward and backward of this many multiply-adds at most (about 1 GB of
# activations for torchvision's resnet50 at 224 px: 12 images; resnet20 on digits keeps its 256)
INTERNAL_BATCH_MACS = 5e10


def plan_of(ctx, opts: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The options fitted to the model, and the compute plan that fitted them (its ``spent``: the study's
    multiply-adds). captum's internal batch and the images any method holds at once are bounded by
    :data:`INTERNAL_BATCH_MACS` (memory; the maps are the same). Then, in the model's forward passes: the
    images attributed (each: every method's passes plus the deletion and insertion curves of every map and a
    random one; at least 2, or 1 when not even 2 fit, after :func:`_coarser` settings), then the sanity
    check: its images (every map again at every randomisation step), and when not even one image fits every
    step, the steps at which the maps are recomputed (at least 2, evenly spaced, the first and the last
    always: the whole network re-initialised)."""
    macs = ctx.multiply_adds()
    at_once = max(1, int(INTERNAL_BATCH_MACS // macs))
    out = dict(opts, internal_batch_size=min(opts["internal_batch_size"], at_once), images_at_once=at_once)
    size = (ctx.data.image_size, ctx.data.image_size)
    methods = method_names(ctx.model, opts["methods"])
    want = ctx.test_images(opts["images"])
    plan = ctx.compute_plan(1)
    _coarser(out, plan, methods, size, min(want, 2))
    maps_each, scored = _study_passes(out, methods, size)
    per_image = scored + 1  # and the prediction
    floor = min(want, 2 if plan.budget == 0 or 2 * per_image <= plan.budget / plan.per_pass else 1)
    got = plan.most(per_image, want)
    if got < floor:
        plan.spend(per_image * (floor - got))
        got = floor
    if got < want:
        plan.cut(f"{got} image(s) attributed instead of {want}")
    out["images"] = got
    if opts["sanity"]:  # every randomisation step recomputes every map of the sanity images
        steps = max(1, len(_randomisation_steps(ctx.model)))
        wanted = min(opts["sanity_images"], got)
        n = plan.most(maps_each * steps, wanted)
        points = steps
        if n == 0:
            n, fit = 1, plan.most(maps_each, steps)
            points = min(steps, max(2, fit))
            plan.spend(maps_each * (points - fit))  # the floor of 2 (the first step and the last), past the budget
            plan.cut(
                f"the sanity check on 1 image, its maps recomputed after {points} of the {steps} "
                "randomisation steps (evenly spaced, the last included)"
            )
        elif n < wanted:
            plan.cut(f"the sanity check on {n} image(s) instead of {wanted} ({steps} randomisation steps)")
        out["sanity_images"], out["sanity_points"] = n, points
    return out, plan


def _study_passes(opts: dict[str, Any], methods: list, size: tuple[int, int]) -> tuple[float, float]:
    """``(maps, scored)``: the passes of one image's maps (every method), and of its maps with their deletion
    and insertion curves (every map's and a random one's)."""
    maps = sum(_passes(key, opts, size) for _, key, _ in methods)
    return maps, maps + 2 * (opts["curve_steps"] + 1) * (len(methods) + 1)


# a model so large that not even two images of the full study fit the budget gets coarser settings first
COARSER = (("curve_steps", 10), ("ig_steps", 16), ("smoothgrad_samples", 8))


def _coarser(out: dict[str, Any], plan: Any, methods: list, size: tuple[int, int], images: int) -> None:
    """Halve the curves' steps, Integrated Gradients' steps and SmoothGrad's samples (down to 10, 16 and 8)
    while ``images`` images of the study do not fit the budget, saying what changed."""
    if not plan.budget:
        return

    def cost() -> float:
        return images * _study_passes(out, methods, size)[1] * plan.per_pass

    for key, least in COARSER:
        was = out[key]
        while cost() > plan.budget and out[key] > least:
            out[key] = max(least, out[key] // 2)
        if out[key] < was:
            plan.cut(f"{key} {out[key]} instead of {was}")


def _fitted(ctx, opts: dict[str, Any], s: Section) -> dict[str, Any]:
    out, plan = plan_of(ctx, opts)
    said = plan.finding(ctx.multiply_adds(), 1)
    if said:
        s.finding(said, "info")
    return out


@hookimpl
def resinspect_estimate(ctx) -> float:
    """The study's multiply-adds, as :func:`plan_of` fits it (for a language model: integrated gradients'
    steps, three passes' worth each, one forward per position ablated, and the deletion checks)."""
    if ctx.task.is_language:
        return token_plan(ctx, ctx.options(NAME))[1].spent
    return plan_of(ctx, ctx.options(NAME))[1].spent


def token_plan(ctx, opts: dict[str, Any]) -> tuple[int, Any]:
    """How many test sequences the token study attributes, fitted to ``--compute`` (at least 1), and the plan:
    each sequence costs integrated gradients' steps (three passes' worth each), one forward per position
    ablated, and the deletion checks (three methods' maps, two k, and the intact pass)."""
    want = ctx.test_images(opts["images"])
    plan = ctx.compute_plan(1)
    each = 3 * opts["ig_steps"] + ctx.data.image_size + 2 * 3 + 1
    got = plan.most(each, want)
    if got < 1:
        plan.spend(each)
        got = 1
    if got < want:
        plan.cut(f"{got} sequence(s) attributed instead of {want}")
    return got, plan


def _analyze(ctx, model: nn.Module, opts: dict[str, Any], s: Section) -> Section:
    opts = _fitted(ctx, opts, s)
    x, y, masks = _images(ctx, opts["images"])
    with torch.no_grad():
        pred = model(x).argmax(1)
    methods = method_names(model, opts["methods"])
    maps = _maps(model, methods, x, pred, opts, ctx, ctx.seed, desc="attribution maps")
    gen = torch.Generator().manual_seed(ctx.seed)
    random_map = torch.rand(maps[methods[0][0]].shape, generator=gen).to(x.device)
    rows, scores = [], {}
    every = list(maps.items()) + [("random (baseline)", random_map)]
    for name, m in ctx.progress(ctx.split(every), desc="deletion/insertion scoring"):
        _, _, d_auc, i_auc = deletion_insertion(
            model, x, pred, m, steps=opts["curve_steps"], batch_size=opts["internal_batch_size"]
        )
        sc = {"deletion_auc": d_auc.mean().item(), "insertion_auc": i_auc.mean().item()}
        if masks is not None:
            sc["pointing_game"] = pointing_game(m, masks).mean().item()
            sc["mask_share"] = mask_share(m, masks).mean().item()
        scores[name] = sc
    if ctx.world_size > 1:  # each rank scored its share of the methods
        gathered = {k: v for part in ctx.all_gather(scores) for k, v in part.items()}
        scores = {name: gathered[name] for name, _ in every}
    for name, sc in scores.items():
        for k, v in sc.items():
            s.metrics[f"{name}/{k}"] = v
        rows.append([name] + [sc[k] for k in sc])
    cols = ["method", "deletion AUC ↓", "insertion AUC ↑"] + (
        ["pointing game ↑", "share in mask ↑"] if masks is not None else []
    )
    s.table(
        f"Faithfulness{' and localisation' if masks is not None else ''} on {len(y)} test images "
        f"(model accuracy on them {float((pred == y).float().mean()):.0%})",
        cols,
        rows,
        caption="Deletion/insertion: area under the target-class probability curve as pixels are removed / "
        "revealed in attribution order. Pointing game: fraction of images whose top pixel is on the "
        "object; chance equals the object's area fraction, "
        + (f"{masks.float().mean():.2f} here." if masks is not None else "n/a."),
    )
    if masks is not None:
        s.metrics["mask_area_fraction"] = masks.float().mean().item()
    sanity = _sanity(ctx, model, methods, x, pred, maps, opts, s) if opts["sanity"] else None
    _findings(s, scores, masks is not None, sanity, opts)
    _grids(s, ctx, x, y, pred, maps)
    return s


def _randomisation_steps(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Cumulative re-initialisation order: the head first, then residual blocks from the output backwards."""
    steps: list[tuple[str, list[nn.Module]]] = []
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        steps.append((linears[-1][0], [linears[-1][1]]))
    blocks = residual_blocks(model)
    if blocks:
        steps += [(b.name, [b.module]) for b in reversed(blocks)]
    else:
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        steps += [(n, [m]) for n, m in reversed(convs)]
    return steps


def _reinit(modules: list[nn.Module], gen_seed: int) -> None:
    torch.manual_seed(gen_seed)
    for mod in modules:
        for sub in mod.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            if is_batchnorm(sub):
                sub.reset_running_stats()
                with torch.no_grad():  # BN at its defaults would make random blocks near-identical; draw scales
                    sub.weight.uniform_(0.5, 1.5) if sub.weight is not None else None


def _sanity(ctx, model, methods, x, pred, maps, opts, s: Section) -> dict[str, list[float]]:
    n = min(opts["sanity_images"], len(x))
    xs, ts = x[:n], pred[:n]
    originals = {name: m[:n] for name, m in maps.items()}
    twin = copy.deepcopy(model).eval()
    steps = _randomisation_steps(twin)
    rho: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    fresh_methods = method_names(twin, opts["methods"])
    cpu_state = torch.random.get_rng_state()
    points = checkpoints(len(steps), opts.get("sanity_points") or len(steps))
    try:
        for i, (_, modules) in enumerate(ctx.progress(steps, desc="cascading randomisation")):
            _reinit(modules, ctx.seed + 1000 + i)
            if i not in points:
                continue
            new = _maps(twin, fresh_methods, xs, ts, opts, ctx, ctx.seed + 100 * (i + 1))
            for name in rho:
                rho[name].append(spearman(new[name].abs(), originals[name].abs()).mean().item())
    finally:
        torch.random.set_rng_state(cpu_state)
    shown = [steps[i] for i in points]
    s.table(
        "Sanity check: Spearman correlation with the original maps as layers are re-initialised",
        ["method"] + [f"+{name}" for name, _ in shown],
        [[name] + vals for name, vals in rho.items()],
        caption="Cumulative, from the output backwards: each column re-initialises one more part"
        + (
            ""
            if len(points) == len(steps)
            else f" (maps recomputed after {len(points)} of the {len(steps)} steps, "
            "each column also re-initialising the parts before it)"
        )
        + ". Maps that reflect the model decorrelate quickly.",
    )
    for name, vals in rho.items():
        s.metrics[f"{name}/sanity_final_spearman"] = vals[-1]
    _sanity_figure(s, shown, rho)
    return rho


def checkpoints(steps: int, points: int) -> list[int]:
    """``points`` of the indices ``0 … steps-1``, evenly spaced, the first and the last always included."""
    if points >= steps:
        return list(range(steps))
    if points <= 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)})


def _findings(s: Section, scores, has_masks: bool, sanity, opts) -> None:
    methods = {k: v for k, v in scores.items() if not k.startswith("random")}
    rnd = scores["random (baseline)"]
    best_del = min(methods, key=lambda k: methods[k]["deletion_auc"])
    best_ins = max(methods, key=lambda k: methods[k]["insertion_auc"])
    s.finding(
        f"Most faithful by deletion: {best_del} (AUC {methods[best_del]['deletion_auc']:.3f} vs "
        f"{rnd['deletion_auc']:.3f} for a random order); by insertion: {best_ins} "
        f"(AUC {methods[best_ins]['insertion_auc']:.3f} vs {rnd['insertion_auc']:.3f}).",
        "good",
    )
    worse = [k for k, v in methods.items() if v["deletion_auc"] >= rnd["deletion_auc"]]
    if worse:
        s.finding(f"No better than a random pixel order on deletion: {', '.join(worse)}.", "warning")
    if has_masks:
        best_loc = max(methods, key=lambda k: (methods[k]["pointing_game"], methods[k]["mask_share"]))
        s.finding(
            f"Best localised on the shapes masks: {best_loc} (pointing game "
            f"{methods[best_loc]['pointing_game']:.0%}, {methods[best_loc]['mask_share']:.0%} of positive "
            f"attribution inside the object; a random map: {rnd['pointing_game']:.0%}, "
            f"{rnd['mask_share']:.0%}).",
            "good",
        )
    if sanity:
        failed = [k for k, v in sanity.items() if v[-1] > opts["sanity_threshold"]]
        passed = [k for k in sanity if k not in failed]
        if failed:
            s.finding(
                "Fails the sanity check (maps still correlate > "
                f"{opts['sanity_threshold']:g} with the original after the whole network was re-initialised, "
                "so they do not reflect what the model learned): "
                + ", ".join(f"{k} (ρ = {sanity[k][-1]:.2f})" for k in failed)
                + ".",
                "warning",
            )
        if passed:
            s.finding(
                "Passes the sanity check (maps decorrelate as the model is randomised): "
                + ", ".join(f"{k} (ρ = {sanity[k][-1]:.2f})" for k in passed)
                + ".",
                "good",
            )


def _show(img: torch.Tensor) -> np.ndarray:
    a = img.detach().cpu().float()
    a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def _grids(s: Section, ctx, x, y, pred, maps) -> None:
    plt = pyplot()

    picks = []
    for c in range(ctx.data.num_classes):
        idx = (y == c).nonzero()
        if len(idx):
            picks.append(int(idx[0]))
    picks = picks[:10]
    names = ctx.data.class_names
    for name, m in maps.items():
        fig, axes = plt.subplots(3, len(picks), figsize=(1.4 * len(picks) + 0.6, 4.6), squeeze=False)
        for j, i in enumerate(picks):
            img = _show(x[i])
            heat = m[i].detach().cpu().abs().numpy()
            cmap = "gray" if img.ndim == 2 else None
            axes[0, j].imshow(img, cmap=cmap)
            axes[1, j].imshow(heat, cmap="inferno")
            axes[2, j].imshow(img, cmap=cmap)
            axes[2, j].imshow(heat, cmap="inferno", alpha=0.55)
            ok = "✓" if pred[i] == y[i] else "✗"
            axes[0, j].set_title(f"{names[int(y[i])]}→{names[int(pred[i])]} {ok}", fontsize=7)
            for r in range(3):
                axes[r, j].axis("off")
        for r, label in enumerate(("input", "map", "overlay")):
            axes[r, 0].text(
                -0.15, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8
            )
        fig.suptitle(name, fontsize=10)
        s.figure(
            fig,
            f"Attribution maps: {name}",
            "One test image per class (true → predicted label); rows: input, |attribution|, overlay.",
        )


def _sanity_figure(s: Section, steps, rho) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(steps) + 3), 3.6))
    for name, vals in rho.items():
        ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=3, label=name)
    ax.set_xticks(range(1, len(steps) + 1), [n for n, _ in steps], rotation=70, fontsize=7)
    ax.set(ylabel="Spearman ρ with original", ylim=(-0.2, 1.05), title="Cascading randomisation (Adebayo et al. 2018)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    s.figure(
        fig,
        "Sanity check",
        "Rank correlation between each method's maps and the original maps, as the "
        "head and then residual blocks (output → input) are re-initialised cumulatively.",
    )
