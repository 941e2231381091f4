"""Scores for attribution maps: deletion/insertion curves, localisation against masks, rank correlation.

Everything is batched over images and curve steps: no per-pixel or per-image Python loops.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["deletion_insertion", "pointing_game", "mask_share", "spearman", "pixel_ranks"]


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel within its image, 0 for the largest value: ``(B, H, W)`` long."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view_as(maps)


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    maps: torch.Tensor,
    steps: int = 20,
    baseline: float = 0.0,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves (Petsiuk et al. 2018) of the target-class probability.

    Pixels are removed (deletion: set to ``baseline``) or revealed (insertion:
    starting from an all-``baseline`` image) in order of decreasing attribution,
    in ``steps`` equal chunks. Returns ``(deletion [B, steps+1], insertion [B, steps+1],
    deletion AUC [B], insertion AUC [B])``; AUCs by the trapezoid rule over the
    fraction of pixels, in [0, 1]. Lower deletion and higher insertion AUC mean
    a more faithful map.
    """
    b, c, h, w = x.shape
    n = h * w
    ranks = pixel_ranks(maps)  # [B, H, W]
    counts = torch.linspace(0, n, steps + 1, device=x.device).round().long()  # pixels affected per step
    affected = ranks.unsqueeze(0) < counts.view(-1, 1, 1, 1)  # [T+1, B, H, W]
    base = torch.full_like(x, baseline)
    curves = []
    for mode in ("deletion", "insertion"):
        keep = ~affected if mode == "deletion" else affected
        images = torch.where(keep.unsqueeze(2), x.unsqueeze(0), base.unsqueeze(0)).reshape(-1, c, h, w)
        probs = []
        for i in range(0, len(images), batch_size):
            probs.append(torch.softmax(model(images[i : i + batch_size]), dim=1))
        p = torch.cat(probs).view(steps + 1, b, -1)
        curves.append(p.gather(2, target.view(1, b, 1).expand(steps + 1, b, 1))[..., 0].t())  # [B, T+1]
    frac = counts.double() / n
    aucs = [torch.trapezoid(cv.double(), frac, dim=1) for cv in curves]
    return curves[0], curves[1], aucs[0], aucs[1]


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1.0 where the map's top pixel lies on the object, else 0.0: ``[B]``."""
    top = maps.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, top[:, None])[:, 0].float()


def mask_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the positive attribution that falls inside the mask: ``[B]`` in [0, 1]."""
    pos = maps.clamp_min(0).flatten(1)
    inside = (pos * masks.flatten(1).float()).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image between two sets of maps ``(B, H, W)``: ``[B]``."""
    ra = pixel_ranks(a).flatten(1).double()
    rb = pixel_ranks(b).flatten(1).double()
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-30)
