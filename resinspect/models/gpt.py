"""Small GPT-style language models that train on this machine in minutes.

``GPT`` is a decoder-only transformer in the GPT-2 layout: token embeddings plus learned position
embeddings, ``layers`` pre-LayerNorm layers of ``x = x + attn(ln1(x))`` then ``x = x + mlp(ln2(x))`` (causal
attention), a final LayerNorm and an unembedding to the vocabulary, applied at every position: the output is
``(batch, positions, vocabulary)`` logits for next-token prediction. Each layer holds two residual sites
(attention and MLP) that resinspect's anatomy finds on its own, so the plain twins (every skip, only the
attention skips, only the MLP skips) need no code here; the head (``ctx.head()``) is the final norm and the
unembedding.

With ``mlp=False`` the layers are attention only: ``attn-only-2`` is the two-layer attention-only model in
which Olsson et al. 2022 found induction heads.

The layers are the ViT's (:class:`~resinspect.models.vit.TransformerLayer`) with causal attention: every
attention module keeps its last attention pattern ``(batch, heads, query, key)`` in ``last_weights`` when
``keep_weights`` is set, and its heads' outputs can be silenced one by one (``head_mask``): what the ``heads``
plugin reads and ablates.

Registered as ``gpt-tiny`` (4 layers, width 128, 4 heads, context from the data, 64 by default),
``gpt-tiny-2`` … ``gpt-tiny-8`` for depth sweeps, and ``attn-only-2``.
"""

from __future__ import annotations

import torch
from torch import nn

from .vit import TransformerLayer

__all__ = ["GPT", "gpt_factory"]


class GPT(nn.Module):
    """Decoder-only transformer: ``(batch, T)`` token ids to ``(batch, T, vocab)`` next-token logits."""

    def __init__(
        self,
        vocab: int = 256,
        context: int = 64,
        layers: int = 4,
        dim: int = 128,
        heads: int = 4,
        mlp: bool = True,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        self.layers = nn.Sequential(
            *(TransformerLayer(dim, heads, mlp_ratio, causal=True, mlp=mlp) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(dim)
        self.unembed = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm(self.layers(self.embed(tokens))))


def gpt_factory(layers: int = 4, dim: int = 128, heads: int = 4, mlp: bool = True):
    """A model factory: ``num_classes`` is the vocabulary size and ``image_size`` the context length (what a
    language-model dataset's bundle holds, see :mod:`resinspect.task`)."""

    def factory(num_classes: int = 256, image_size: int | None = None) -> nn.Module:
        return GPT(vocab=num_classes, context=image_size or 64, layers=layers, dim=dim, heads=heads, mlp=mlp)

    return factory
