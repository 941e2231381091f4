"""Attribution methods through captum, each returning one map per image: a ``(B, H, W)`` tensor.

Channel attributions are summed to one value per pixel. GradCAM maps at the
output of each residual stage are upsampled to the input size. ``METHODS``
maps a name to ``fn(model, x, target, opts, stage=None) -> maps``; add to it
to score a method of your own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["METHODS", "attribute", "stage_modules", "method_names"]


def _saliency(model, x, target, opts, stage=None):
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=target, abs=True).sum(1)


def _integrated_gradients(model, x, target, opts, stage=None):
    from captum.attr import IntegratedGradients

    return (
        IntegratedGradients(model)
        .attribute(
            x,
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=opts["ig_steps"],
            internal_batch_size=opts["internal_batch_size"],
        )
        .sum(1)
    )


def _smoothgrad(model, x, target, opts, stage=None):
    from captum.attr import NoiseTunnel, Saliency

    return (
        NoiseTunnel(Saliency(model))
        .attribute(
            x,
            nt_type="smoothgrad",
            nt_samples=opts["smoothgrad_samples"],
            stdevs=opts["smoothgrad_std"],
            nt_samples_batch_size=min(opts["smoothgrad_samples"], opts.get("per_eval") or opts["smoothgrad_samples"]),
            target=target,
            abs=True,
        )
        .sum(1)
    )


def _gradient_shap(model, x, target, opts, stage=None):
    from captum.attr import GradientShap

    baselines = torch.zeros((4, *x.shape[1:]), device=x.device, dtype=x.dtype)
    return (
        GradientShap(model)
        .attribute(x, baselines=baselines, target=target, n_samples=opts["ig_steps"], stdevs=opts["smoothgrad_std"])
        .sum(1)
    )


def _occlusion(model, x, target, opts, stage=None):
    from captum.attr import Occlusion

    w = max(2, opts["occlusion_window"] or x.shape[-1] // 4)
    stride = max(1, w // 2)
    return (
        Occlusion(model)
        .attribute(
            x,
            sliding_window_shapes=(x.shape[1], w, w),
            strides=(x.shape[1], stride, stride),
            baselines=0.0,
            target=target,
            # forward passes only (no activations kept for a backward): three times as many images at once
            perturbations_per_eval=3 * (opts.get("per_eval") or opts["internal_batch_size"]),
        )
        .sum(1)
    )


def token_grid(tokens: int) -> tuple[int, int, int]:
    """``(extra, h, w)``: a token stream of ``tokens`` tokens read as ``extra`` leading tokens (a class token,
    register tokens) followed by an ``h × w`` patch grid, the fewest extra tokens first (at most 8)."""
    for extra in range(0, min(9, tokens)):
        side = math.isqrt(tokens - extra)
        if side * side == tokens - extra and side > 0:
            return extra, side, side
    raise ValueError(f"a stream of {tokens} tokens is no square patch grid (after up to 8 leading tokens)")


def _gradcam(model, x, target, opts, stage=None):
    """GradCAM (Selvaraju et al. 2017) at ``stage``'s output: captum's LayerGradCam for feature maps; for a
    token stream (B, N, D) the same computation over the patch grid — token features weighted by their mean
    gradient, summed, ReLU — with leading (class) tokens dropped, then upsampled to the image, on the stream
    entering the stage's last layer (the last stream reaches a ViT's head through the class token only)."""
    from captum.attr import LayerAttribution, LayerGradCam

    probe: dict[str, Any] = {}

    def keep(key: str, value: Any) -> None:  # a forward hook must return None (else it replaces the output)
        probe.setdefault(key, value)

    handle = stage.register_forward_hook(lambda _m, _i, out: keep("shape", tuple(out.shape)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    if len(probe["shape"]) != 3:
        attr = LayerGradCam(model, stage).attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    # a ViT's last stream reaches the head through the class token alone (no gradient at the patch tokens):
    # read the stream entering the stage's last layer instead, as pytorch-grad-cam's ViT recipe does
    from resinspect import residual_blocks

    inside = [b for b in residual_blocks(model) if b.stage_name and model.get_submodule(b.stage_name) is stage]
    layer = model.get_submodule(inside[-1].layer) if inside else stage
    if inside:
        handle = layer.register_forward_hook(lambda _m, inputs, _o: keep("a", inputs[0]))
    else:
        handle = stage.register_forward_hook(lambda _m, _i, out: keep("a", out))
    try:
        with torch.enable_grad():
            logits = model(x)
            t = torch.as_tensor(target, device=logits.device).reshape(-1)
            score = logits.gather(1, t.expand(len(logits))[:, None] if len(t) == 1 else t[:, None]).sum()
            (grad,) = torch.autograd.grad(score, probe["a"])
    finally:
        handle.remove()
    acts = probe["a"].detach()
    extra, h, w = token_grid(acts.shape[1])
    weights = grad[:, extra:].mean(1, keepdim=True)
    cam = torch.relu((weights * acts[:, extra:]).sum(-1)).reshape(len(x), 1, h, w)
    return torch.nn.functional.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules whose weights attention rollout reads: ``nn.MultiheadAttention`` (asked for
    its weights through a keyword pre-hook) and modules with a ``keep_weights`` switch and ``last_weights``
    (resinspect's vit-tiny)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention) or (hasattr(m, "keep_weights") and hasattr(m, "last_weights"))
    ]


def _rollout(model, x, target, opts, stage=None):
    """Attention rollout (Abnar & Zuidema 2020): each layer's attention averaged over heads, mixed with the
    identity for the residual stream (½A + ½I, rows renormalised), multiplied through the layers in call order;
    the class token's row over the patch grid is the map (the mean row when there is no leading token). It does
    not depend on the target class."""
    weights: list[torch.Tensor] = []
    handles: list[Any] = []
    switched: list[tuple[Any, bool]] = []

    def ask(_m, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

    def keep(m, _i, out):
        if isinstance(m, nn.MultiheadAttention):
            weights.append(out[1].detach())
        else:
            weights.append(m.last_weights.mean(1))

    try:
        for m in attention_modules(model):
            if isinstance(m, nn.MultiheadAttention):
                handles.append(m.register_forward_pre_hook(ask, with_kwargs=True))
            else:
                switched.append((m, bool(m.keep_weights)))
                m.keep_weights = True  # type: ignore[assignment]
            handles.append(m.register_forward_hook(keep))
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, was in switched:
            m.keep_weights = was
    if not weights:
        raise ValueError("attention rollout needs self-attention modules, and this model calls none")
    n = weights[0].shape[-1]
    eye = torch.eye(n, device=x.device, dtype=torch.float64)
    rollout = eye.expand(len(x), n, n)
    for a in weights:
        a = 0.5 * a.double() + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    extra, side, _ = token_grid(n)
    row = rollout[:, 0, extra:] if extra else rollout.mean(1)
    cam = row.reshape(len(x), 1, side, side).float()
    return torch.nn.functional.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
    "gradient_shap": _gradient_shap,
    "occlusion": _occlusion,
    "gradcam": _gradcam,
    "attention_rollout": _rollout,
}


def stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The output module of each residual stage (the container of its blocks), for GradCAM."""
    from resinspect import residual_blocks

    stages: dict[str, nn.Module] = {}
    for b in residual_blocks(model):
        if b.stage_name:
            stages[b.stage_name] = model.get_submodule(b.stage_name)
    if not stages:  # no residual stages: the last 4-D producing conv layer
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if convs:
            stages[convs[-1][0]] = convs[-1][1]
    return stages


def method_names(model: nn.Module, requested: list[str]) -> list[tuple[str, str, Any]]:
    """``[(display name, method key, stage module or None)]``; ``gradcam`` expands to one entry per stage;
    ``attention_rollout`` is left out for a model without self-attention."""
    out: list[tuple[str, str, Any]] = []
    for key in requested:
        if key == "attention_rollout" and not attention_modules(model):
            continue
        if key == "gradcam":
            out += [(f"gradcam:{name}", key, mod) for name, mod in stage_modules(model).items()]
        else:
            out.append((key, key, None))
    return out


def attribute(
    model: nn.Module,
    key: str,
    x: torch.Tensor,
    target: torch.Tensor,
    opts: dict[str, Any],
    stage: nn.Module | None = None,
) -> torch.Tensor:
    """Maps ``(B, H, W)`` for method ``key``, detached (the model's gradients are left untouched).

    Memory is bounded by ``opts["images_at_once"]`` (default: ``internal_batch_size``): the images go through
    in chunks of at most that many, and SmoothGrad's noisy copies and Occlusion's perturbations are batched so
    that one forward holds about that many images (Integrated Gradients batches itself, by
    ``internal_batch_size``)."""
    at_once = max(1, int(opts.get("images_at_once") or opts["internal_batch_size"]))
    step = len(x) if key == "integrated_gradients" else min(len(x), at_once)
    t = torch.as_tensor(target, device=x.device).reshape(-1)
    saved = [p.grad for p in model.parameters()]
    parts = []
    try:
        for i in range(0, len(x), step):
            chunk = x[i : i + step].detach().clone().requires_grad_(True)
            these = dict(opts, per_eval=max(1, at_once // len(chunk)))
            target_i = t if len(t) == 1 else t[i : i + step]
            with torch.enable_grad():
                parts.append(METHODS[key](model, chunk, target_i, these, stage=stage).detach())
    finally:
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return torch.cat(parts)
