"""A small Vision Transformer that trains on this machine's datasets in a minute or two.

``ViT`` is the pre-norm transformer of Dosovitskiy et al. 2021 at toy scale:
a patch embedding (a convolution with stride = patch), a class token, learned
position embeddings, ``depth`` layers of ``x = x + attn(ln1(x))`` then
``x = x + mlp(ln2(x))``, a final LayerNorm and a linear head on the class
token. Each layer therefore holds two residual sites (attention and MLP),
which resinspect's anatomy finds on its own, so its plain twins (every skip,
only the attention skips, only the MLP skips) need no code here.

Registered as ``vit-tiny`` (6 layers, width 128, 4 heads, patch 4) and
``vit-tiny-4`` … ``vit-tiny-12`` for depth sweeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Mlp", "TransformerLayer", "ViT"]


class Attention(nn.Module):
    """Multi-head self-attention, ``causal`` for a language model (each position sees itself and the earlier
    ones). ``last_weights`` keeps the attention pattern ``(batch, heads, query, key)`` of the last call when
    ``keep_weights`` is set (attention rollout, the heads plugin); ``head_mask`` (a ``(heads,)`` tensor or None)
    multiplies each head's output before the output projection (0 silences a head). Without gradients and
    without kept weights attention runs fused; otherwise it is written out, which has second derivatives
    (Hessian-vector products; CPU's fused kernel has none)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.keep_weights = False
        self.last_weights: torch.Tensor | None = None
        self.head_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.keep_weights or torch.is_grad_enabled():
            scores = q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5
            if self.causal:
                causal = torch.ones_like(scores[0, 0], dtype=torch.bool).tril()  # (queries, keys); traceable
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            if self.keep_weights:
                self.last_weights = weights.detach()
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        if self.head_mask is not None:
            out = out * self.head_mask.to(out.dtype).reshape(1, -1, 1, 1)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: two residual additions, attention then MLP (``mlp=False``: attention only,
    one addition); ``causal`` attention for a language model."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, causal: bool = False, mlp: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim) if mlp else None
        self.mlp = Mlp(dim, mlp_ratio * dim) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if self.mlp is not None and self.ln2 is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class ViT(nn.Module):
    """Vision Transformer: patch embedding, class token, ``depth`` pre-norm layers, LayerNorm, linear head."""

    def __init__(
        self,
        image_size: int = 32,
        patch: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        depth: int = 6,
        dim: int = 128,
        heads: int = 4,
        mlp_ratio: int = 2,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.layers = nn.Sequential(*(TransformerLayer(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.embed(x))
        return self.head(self.norm(x)[:, 0])


def vit_tiny(depth: int = 6):
    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
        size = image_size or 32
        patch = 4 if size % 4 == 0 and size >= 16 else 2 if size % 2 == 0 else 1
        return ViT(size, patch, in_channels, num_classes, depth=depth)

    return factory
