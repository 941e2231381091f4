"""The input gradient of a residual network decomposed exactly by path length (Veit et al. 2016, §5).

A network of N residual blocks ``y_i = post_i(S_i(x_i) + F_i(x_i))`` unravels into 2^N paths; a path of
length k crosses k branches and N − k shortcuts. At a forward point the backward map of block i is linear,
``u ↦ S_iᵀ D_i u + F_iᵀ D_i u`` (``D_i`` the derivative of ``post_i``), so the gradient reaching the first
block's input splits exactly into ``g = Σ_k g_k`` with ``g_k`` the sum over all paths of length k. The
stack ``G[k]`` is propagated backwards one block at a time: the shortcut keeps a level, the branch moves
level k − 1 to k. Only the levels that can be non-zero are touched (after j blocks, j + 1 of them), and all
levels of one block go through *one* forward/backward pass of the block's split graph, on the block input
repeated once per level (the network is in eval mode, so samples are independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from resinspect import ResidualBlock, capture, eval_mode, forwards_replaced

__all__ = ["PathSums", "decompose_batch", "path_gradients", "brute_force_by_length"]


@dataclass
class PathSums:
    """Per-batch sums over samples, so batches (and later processes) add up.

    ``norm_sum[k]`` / ``norm_sq_sum[k]``: Σ‖g_k‖ and Σ‖g_k‖² over samples; ``total_norm_sum``: Σ‖g‖;
    ``max_rel_error``: the largest ‖Σ_k g_k − g‖ / ‖g‖ seen (g from ordinary autograd).
    """

    n_blocks: int
    norm_sum: torch.Tensor = None  # type: ignore[assignment]
    norm_sq_sum: torch.Tensor = None  # type: ignore[assignment]
    total_norm_sum: float = 0.0
    count: int = 0
    max_rel_error: float = 0.0

    def __post_init__(self) -> None:
        if self.norm_sum is None:
            self.norm_sum = torch.zeros(self.n_blocks + 1, dtype=torch.float64)
            self.norm_sq_sum = torch.zeros(self.n_blocks + 1, dtype=torch.float64)

    def add(self, levels: torch.Tensor, full: torch.Tensor) -> None:
        """``levels``: ``[N + 1, batch, ...]`` (the g_k), ``full``: ``[batch, ...]`` (autograd's g)."""
        norms = levels.flatten(2).double().norm(dim=2)  # [N + 1, batch]
        self.norm_sum += norms.sum(1).cpu()
        self.norm_sq_sum += (norms * norms).sum(1).cpu()
        full_norm = full.flatten(1).double().norm(dim=1)
        self.total_norm_sum += float(full_norm.sum())
        err = (levels.sum(0) - full).flatten(1).double().norm(dim=1) / full_norm.clamp_min(1e-30)
        self.max_rel_error = max(self.max_rel_error, float(err.max()))
        self.count += full.shape[0]

    def mean(self) -> torch.Tensor:
        return self.norm_sum / max(1, self.count)

    def std(self) -> torch.Tensor:
        m = self.mean()
        return (self.norm_sq_sum / max(1, self.count) - m * m).clamp_min(0).sqrt()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # summed, not averaged: each sample's gradient is that of its own loss
    return F.cross_entropy(model(x), y, reduction="sum")


def _chain_vjp(later_input: torch.Tensor, earlier_output: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Pull every level of ``stack`` (cotangents at ``later_input``) back to ``earlier_output`` through
    whatever lies between two blocks (nothing, usually)."""
    if later_input is earlier_output:
        return stack
    (out,) = torch.autograd.grad(later_input, earlier_output, stack, retain_graph=True, is_grads_batched=True)
    return out


def _through_block(block: ResidualBlock, x: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """One block backwards for all levels at once: ``[m, B, ...]`` → ``[m + 1, B, ...]``.

    One forward of the block's split graph at ``x``, then one batched backward (``is_grads_batched``:
    vmap over the levels) gives each level's shortcut part and branch part."""
    m = stack.shape[0]
    x_branch, x_skip = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = block.variant("split")(x_branch, x_skip)
    skip, branch = torch.autograd.grad(out, (x_skip, x_branch), stack, is_grads_batched=True, allow_unused=True)
    new = torch.zeros(m + 1, *x.shape, dtype=stack.dtype, device=stack.device)
    if skip is not None:
        new[:m] += skip
    if branch is not None:
        new[1:] += branch
    return new


def decompose_batch(
    model: nn.Module, blocks: list[ResidualBlock], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [N + 1, B, *input of block 0], autograd's gradient at that input)`` for one batch.

    The model must be in eval mode; nothing of it is changed.
    """
    names = [b.name for b in blocks]
    with capture(blocks, detach=False) as seen, torch.enable_grad():
        # the input requires grad so that block 0's input is in the graph even without a stem
        loss = _loss(model, x.detach().requires_grad_(True), y)
    full, u = torch.autograd.grad(loss, (seen.inputs[names[0]], seen.outputs[names[-1]]), retain_graph=True)
    stack = u.unsqueeze(0)
    for i in range(len(blocks) - 1, -1, -1):
        stack = _through_block(blocks[i], seen.inputs[names[i]], stack)
        if i > 0:
            stack = _chain_vjp(seen.inputs[names[i]], seen.outputs[names[i - 1]], stack)
    return stack.detach(), full.detach()


def path_gradients(
    model: nn.Module, blocks: list[ResidualBlock], batches, progress=lambda it, **kw: it, at_once: int = 0
) -> PathSums:
    """Accumulate :class:`PathSums` over ``batches`` (eval mode inside; the model is left as it was).
    ``at_once`` > 0: at most that many images decomposed at a time (the backward carries ``N + 1`` gradients
    per image through every block: memory grows with images × blocks)."""
    sums = PathSums(len(blocks))
    with eval_mode(model):
        for x, y in progress(batches, desc="path decomposition (batches)"):
            step = at_once if 0 < at_once < len(x) else len(x)
            for i in range(0, len(x), step):
                levels, full = decompose_batch(model, blocks, x[i : i + step], y[i : i + step])
                sums.add(levels, full)
    return sums


def _gated(block: ResidualBlock, branch_on: bool):
    """The block's forward with the gradient let through only its branch (or only its shortcut)."""
    split = block.variant("split")
    return lambda inp: split(inp if branch_on else inp.detach(), inp.detach() if branch_on else inp)


def brute_force_by_length(
    model: nn.Module, blocks: list[ResidualBlock], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The same ``[N + 1, B, ...]`` decomposition by enumerating all 2^N paths with ordinary autograd: for
    one path, each block lets the gradient through exactly one of its two paths (the other reads a detached
    copy of the input, so the forward point is unchanged). Exponential: for tests on ≤ 6 blocks."""
    n = len(blocks)
    out = None
    with eval_mode(model):
        for mask in range(2**n):
            on = [bool((mask >> i) & 1) for i in range(n)]  # True: through the branch
            with (
                capture(blocks[:1], detach=False, outputs=False, first_only=True) as seen,
                torch.enable_grad(),
                forwards_replaced([(b.module, _gated(b, o)) for b, o in zip(blocks, on)]),
            ):
                loss = _loss(model, x.detach().requires_grad_(True), y)
                (g,) = torch.autograd.grad(loss, seen.inputs[blocks[0].name])
            if out is None:
                out = torch.zeros(n + 1, *g.shape, dtype=g.dtype, device=g.device)
            out[sum(on)] += g
    if out is None:
        raise ValueError("path_gradients: no batches to decompose")
    return out
