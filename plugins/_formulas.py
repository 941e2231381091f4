"""The backward formulas of a residual block's layers, written out and checked against autograd.

For one block of the user's own model (and the model's final linear layer) every convolution, BatchNorm,
ReLU and linear layer gets its input and parameter gradients computed twice — from the formulas below and by
autograd — in float64, and the report shows the largest difference per formula.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from resinspect import Section, capture, eval_mode, residual_blocks

FORMULAS = {
    "conv": "Convolution Y = W ⋆ X + b, written as Y = W·unfold(X) + b: ∂L/∂W = Σₙ ∂L/∂Yₙ · unfold(Xₙ)ᵀ, "
    "∂L/∂X = fold(Wᵀ · ∂L/∂Y), ∂L/∂b = Σ ∂L/∂Y over batch and positions.",
    "batchnorm": "BatchNorm (training mode, statistics over N·H·W per channel) y = γ·x̂ + β, x̂ = (x − μ)/√(σ² + ε): "
    "∂L/∂γ = Σ ∂L/∂y·x̂, ∂L/∂β = Σ ∂L/∂y, ∂L/∂x = γ/√(σ² + ε) · (∂L/∂y − mean(∂L/∂y) − x̂·mean(∂L/∂y·x̂)).",
    "relu": "ReLU y = max(x, 0): ∂L/∂x = ∂L/∂y · 1[x > 0].",
    "linear": "Linear Y = X·Wᵀ + b: ∂L/∂X = ∂L/∂Y·W, ∂L/∂W = (∂L/∂Y)ᵀ·X, ∂L/∂b = Σₙ ∂L/∂Yₙ.",
    "residual": "Residual addition y = F(x) + S(x): ∂L/∂x = J_Sᵀ·∂L/∂y + J_Fᵀ·∂L/∂y — with an identity skip, "
    "∂L/∂x = ∂L/∂y·(1 + ∂F/∂x).",
}

EXPLANATION = (
    "The backward pass of a residual block, layer by layer. Each formula below was evaluated on the "
    "actual input of one block of this model (one test batch, float64, a random upstream gradient) and "
    "compared with PyTorch's autograd; the table shows the largest absolute difference, which should "
    "sit at floating-point noise (around 1e-12 or below).\n\n" + "\n\n".join(FORMULAS.values())
)


def conv_backward(x, w, b, dy, conv: nn.Conv2d):
    padding = cast(tuple[int, ...], conv.padding)  # (_kind admits only tuple padding)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    n, o = dy.shape[:2]
    dym = dy.reshape(n, o, -1)
    dw = torch.einsum("nol,nkl->ok", dym, cols).reshape(w.shape)
    dcols = torch.einsum("ok,nol->nkl", w.reshape(o, -1), dym)
    dx = F.fold(dcols, x.shape[-2:], conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    db = dy.sum((0, 2, 3)) if b is not None else None
    return dx, {"weight": dw, "bias": db}


def batchnorm_backward(x, gamma, beta, dy, eps: float):
    dims = (0, 2, 3)
    mu = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    xhat = (x - mu) / torch.sqrt(var + eps)
    g = gamma.view(1, -1, 1, 1)
    dx = g / torch.sqrt(var + eps) * (dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True))
    return dx, {"weight": (dy * xhat).sum(dims), "bias": dy.sum(dims)}


def relu_backward(x, dy):
    return dy * (x > 0).to(dy.dtype), {}


def linear_backward(x, w, b, dy):
    """Also for inputs with several leading dimensions (tokens (B, N, D), ConvNeXt's channels-last maps): the
    formulas hold for the rows of X flattened to (n, in_features), each row one sample of the sum."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy2 @ w).reshape(x.shape), {"weight": dy2.t() @ x2, "bias": dy2.sum(0) if b is not None else None}


def _check_layer(kind: str, layer: nn.Module, x: torch.Tensor, gen: torch.Generator) -> float:
    module = cast(Any, layer)  # a Conv2d, BatchNorm2d, ReLU or Linear, by kind
    x = x.detach().clone().requires_grad_(True)
    module.train(kind == "batchnorm")  # BN: the batch-statistics formula
    y = module(x.clone())  # a clone, so that in-place modules (ReLU(inplace=True)) leave x intact
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)  # a CPU generator: same numbers on any device
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    auto = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    auto_dx, auto_p = auto[0], dict(zip(params, auto[1:]))
    if kind == "conv":
        dx, dp = conv_backward(x.detach(), module.weight.detach(), module.bias, dy, module)
    elif kind == "batchnorm":
        dx, dp = batchnorm_backward(x.detach(), module.weight.detach(), module.bias, dy, module.eps)
    elif kind == "relu":
        dx, dp = relu_backward(x.detach(), dy)
    else:
        dx, dp = linear_backward(x.detach(), module.weight.detach(), module.bias, dy)
    diffs = [(dx - auto_dx).abs().max().item()]
    for n, g in auto_p.items():
        if g is not None and dp.get(n) is not None:
            diffs.append((dp[n] - g).abs().max().item())
    return max(diffs)


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        return "conv"
    if isinstance(m, nn.BatchNorm2d) and m.affine:
        return "batchnorm"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


@torch.no_grad()
def _capture_inputs(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    # capture takes inputs before the module runs (an in-place ReLU would overwrite them)
    with capture(modules, outputs=False, first_only=True) as seen, eval_mode(model):
        model(x)
    return seen.inputs


def check_model_formulas(ctx) -> Section:
    """Check every formula on one residual block (the first non-downsampling one) and the last linear layer."""
    s = Section(title="Backward formulas, checked against autograd", explanation=EXPLANATION, docs="explainer-gradient")
    model = ctx.model
    x = next(ctx.test_batches(16))[0]
    blocks = residual_blocks(model)
    block = next((b for b in blocks if not b.downsamples), blocks[0] if blocks else None)
    prefix = f"{block.name}." if block is not None else ""
    candidates = {}
    if block is not None:
        candidates.update({f"{prefix}{n}": m for n, m in block.module.named_modules() if n and _kind(m)})
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        candidates[linears[-1][0]] = linears[-1][1]
    if block is None:  # a plain network: check the first layers of each kind
        for n, m in model.named_modules():
            k = _kind(m)
            if k and not any(_kind(c) == k for c in candidates.values()):
                candidates[n] = m
    inputs = _capture_inputs(model, dict(candidates), x)
    gen = torch.Generator().manual_seed(ctx.seed)
    rows: list[list[Any]] = []
    worst: dict[str, float] = {}
    skipped: list[str] = []
    for name, module in candidates.items():
        kind = _kind(module)
        if name not in inputs or kind is None:
            continue
        try:
            diff = _check_layer(kind, copy.deepcopy(module).double(), inputs[name].double(), gen)
        except (RuntimeError, ValueError) as e:  # a layer the written formula does not cover: said, never fatal
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            skipped.append(f"{name} ({kind}, input {tuple(inputs[name].shape)}): {first}")
            continue
        rows.append([kind, name, diff])
        worst[kind] = max(worst.get(kind, 0.0), diff)
    if block is not None:
        bx = _capture_inputs(model, {"block": block.module}, x)["block"].double()
        diff = _check_residual(block, bx, gen)
        rows.append(["residual", block.name, diff])
        worst["residual"] = diff
    s.table("Largest |formula − autograd| per layer (float64)", ["formula", "layer", "max abs difference"], rows)
    if skipped:
        s.finding(f"Not checked (the written formula does not apply): {'; '.join(skipped)}.", "info")
    for kind, d in worst.items():
        s.metrics[f"max_abs_diff/{kind}"] = d
    if worst:
        big = max(worst.values())
        s.finding(
            f"All {len(rows)} checks of the written backward formulas ({', '.join(worst)}) agree with autograd "
            f"to {big:.1e} or better on {block.name if block else 'the first layers'} of this model."
            if big < 1e-8
            else f"A backward formula differs from autograd by {big:.1e}: see the table.",
            "good" if big < 1e-8 else "critical",
        )
    return s


def _check_residual(block, x: torch.Tensor, gen: torch.Generator) -> float:
    """dL/dx of the whole block by autograd vs the sum of the skip and branch parts computed separately."""
    module = copy.deepcopy(block.module).double().eval()
    fresh = residual_blocks(module)[0]  # the copy is itself the (only, root) block
    x = x.detach().clone().requires_grad_(True)
    y = module(x.clone())
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)  # a CPU generator: same numbers on any device
    (auto_dx,) = torch.autograd.grad(y, x, dy)
    xb, xs = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    y2 = fresh.variant("split")(xb, xs)
    gb, gs = torch.autograd.grad(y2, [xb, xs], dy)
    return (gb + gs - auto_dx).abs().max().item()
