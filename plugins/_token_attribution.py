"""Attribution of a language model's next-token prediction to its input tokens, through captum.

The output explained is the log-probability the model gives the true next token at the last position. Two
methods: integrated gradients on the token embeddings (captum's ``LayerIntegratedGradients`` on the model's
token-embedding layer; the baseline is token 0 at every position, the attribution of a position the sum over
its embedding's features), and feature ablation over tokens (captum's ``FeatureAblation``: each position in
turn replaced by token 0, the attribution the drop in log-probability). Faithfulness: replacing the most
attributed tokens first should lower the log-probability faster than a random order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["embedding_layer", "target_logprob", "token_attributions", "deletion_drop"]


def embedding_layer(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding: its first ``nn.Embedding`` in forward order (None when it has none)."""
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def target_logprob(model: nn.Module, targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(tokens)``: the log-probability of ``targets`` (one token per sequence) at the last position."""

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(model(tokens)[:, -1].float(), -1)
        # captum may evaluate several perturbed copies of the batch at once: targets repeat batch by batch
        wanted = targets.repeat(logp.shape[0] // targets.shape[0])
        return logp.gather(1, wanted[:, None]).squeeze(1)

    return forward


def token_attributions(
    model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, steps: int
) -> dict[str, torch.Tensor]:
    """``{"integrated_gradients": (B, T), "feature_ablation": (B, T)}`` attributions of each input position to
    the log-probability of ``targets`` at the last position."""
    from captum.attr import FeatureAblation, LayerIntegratedGradients

    layer = embedding_layer(model)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding to attribute through")
    baseline = torch.zeros_like(tokens)
    out = {}
    ig = LayerIntegratedGradients(target_logprob(model, targets), layer)
    out["integrated_gradients"] = ig.attribute(tokens, baselines=baseline, n_steps=steps).sum(-1).detach()
    with torch.no_grad():
        fa = FeatureAblation(target_logprob(model, targets))
        out["feature_ablation"] = fa.attribute(tokens, baselines=0).float().detach()
    return out


@torch.no_grad()
def deletion_drop(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sequence, how much the target's log-probability falls when the ``k`` positions with the largest
    ``scores`` are replaced by token 0 (``clean``: the intact log-probabilities, when already computed)."""
    f = target_logprob(model, targets)
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    cut = tokens.scatter(1, top, 0)
    return (f(tokens) if clean is None else clean) - f(cut)
