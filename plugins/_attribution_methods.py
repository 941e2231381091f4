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
            nt_samples_batch_size=opts["smoothgrad_samples"],
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
            perturbations_per_eval=opts["internal_batch_size"],
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
    gradient, summed, ReLU — with leading (class) tokens dropped, then upsampled to the image."""
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


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "integrated_gradients": _integrated_gradients,
    "smoothgrad": _smoothgrad,
    "gradient_shap": _gradient_shap,
    "occlusion": _occlusion,
    "gradcam": _gradcam,
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
    """``[(display name, method key, stage module or None)]``; ``gradcam`` expands to one entry per stage."""
    out: list[tuple[str, str, Any]] = []
    for key in requested:
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
    """Maps ``(B, H, W)`` for method ``key``, detached (the model's gradients are left untouched)."""
    saved = [p.grad for p in model.parameters()]
    try:
        with torch.enable_grad():
            maps = METHODS[key](model, x.detach().clone().requires_grad_(True), target, opts, stage=stage)
    finally:
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return maps.detach()
