"""The scores of attention heads, as closed-form functions of attention patterns.

A pattern is ``(batch, heads, query, key)``, each row a distribution over keys. Olsson et al. 2022:

- previous-token score: the mean attention from position ``t`` to ``t − 1`` (over ``t ≥ 1``);
- induction score, on sequences that repeat with period ``p`` (position ``t ≥ p`` holds the token of
  ``t − p``): the mean attention from ``t`` to ``t − p + 1``, the token *after* the earlier occurrence of the
  current one (over ``t ≥ p``).

Both are 1 for a head that attends only there, and about ``1 / (t + 1)`` averaged over positions for uniform
causal attention.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "previous_token_score",
    "induction_score",
    "attention_modules",
    "head_count",
    "is_builtin_attention",
    "repeated_tokens",
]


def previous_token_score(weights: torch.Tensor) -> torch.Tensor:
    """Per head ``(heads,)``: mean over the batch and the positions ``t ≥ 1`` of ``weights[..., t, t - 1]``."""
    t = weights.shape[-1]
    return (
        weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1))
        if t > 1
        else weights.new_zeros(weights.shape[1])
    )


def induction_score(weights: torch.Tensor, period: int) -> torch.Tensor:
    """Per head ``(heads,)``: mean over the batch and the positions ``t ≥ period`` of
    ``weights[..., t, t - period + 1]`` (sequences repeating with ``period``)."""
    t = weights.shape[-1]
    if not 1 <= period < t:
        raise ValueError(f"period {period} leaves no repeated position in {t}")
    return weights.diagonal(offset=-(period - 1), dim1=-2, dim2=-1)[..., 1:].mean(dim=(0, -1))


def is_builtin_attention(m: nn.Module) -> bool:
    """resinspect's own attention: ``heads``, ``keep_weights`` / ``last_weights`` and ``head_mask``."""
    return isinstance(getattr(m, "heads", None), int) and hasattr(m, "keep_weights") and hasattr(m, "head_mask")


def head_count(m: nn.Module) -> int:
    """The number of heads of an attention module listed by :func:`attention_modules`."""
    return int(getattr(m, "heads" if is_builtin_attention(m) else "resinspect_heads"))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules whose patterns resinspect can read and whose heads it can silence, in the order of
    the forward: resinspect's own (see :func:`is_builtin_attention`), and those that name their heads with
    ``resinspect_heads`` (how many) and ``resinspect_head_output`` (the child that reads the heads' outputs side
    by side) and return their pattern as the second element of their output — Hugging Face attention in eager
    mode, marked so by ``hf:`` models."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if is_builtin_attention(m)
        or (isinstance(getattr(m, "resinspect_heads", None), int) and hasattr(m, "resinspect_head_output"))
    ]


def repeated_tokens(n: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, int]:
    """``n`` sequences of ``length`` tokens: ``p = length // 2`` random tokens, then the same again (cut to
    ``length``); returns the tokens and the period ``p``."""
    p = max(1, length // 2)
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, vocab, (n, p), generator=g)
    return torch.cat([first, first, first], dim=1)[:, :length], p
