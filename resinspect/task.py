"""What a network is trained to do, and how its outputs are scored: the run's *task*.

Two tasks, chosen by the data (``DataBundle.task``):

- ``classification``: inputs are images ``(B, C, H, W)`` (or any batch), targets are class indices ``(B,)``,
  outputs are logits ``(B, classes)``; the loss is the mean cross-entropy and the score is accuracy.
- ``next-token``: inputs are token ids ``(B, T)``, targets are the next tokens ``(B, T)`` (the input shifted
  by one), outputs are logits ``(B, T, vocabulary)``; the loss is the mean next-token cross-entropy over every
  position, the score is next-token accuracy, and perplexity is ``exp(loss)``.

Both are the same formula once the outputs are flattened to one row per prediction, so
:meth:`Task.loss` and :meth:`Task.correct` serve either. A plugin asks the run's task
(``ctx.task.loss(outputs, y)``) instead of calling ``F.cross_entropy(outputs, y)``; one sample is one image
or one sequence, one *prediction* one image or one token (:meth:`Task.predictions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ResinspectError

__all__ = ["Task", "CLASSIFICATION", "NEXT_TOKEN", "TASKS", "task_named", "cross_entropy"]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the last dimension, one row per prediction, for either task: class logits
    ``(B, C)`` or next-token logits ``(B, T, V)``, against indices (``(B,)`` / ``(B, T)``) or, when ``targets``
    is floating point and shaped like ``outputs``, probabilities. ``reduction`` as in
    :func:`torch.nn.functional.cross_entropy`, over every prediction (``"none"``: shaped like the indices).
    ``F.cross_entropy(outputs, targets)`` itself reads dimension 1 as the classes, which is wrong for
    ``(B, T, V)``."""
    soft = targets.is_floating_point() and targets.shape == outputs.shape
    flat = targets.flatten(0, -2) if soft else targets.flatten()
    out = F.cross_entropy(outputs.flatten(0, -2), flat, reduction=reduction)
    return out.reshape(outputs.shape[:-1]) if reduction == "none" else out


@dataclass(frozen=True)
class Task:
    """A task's name, its words for the report, and its loss and score.

    ``name``: ``classification`` or ``next-token``; ``sample``: what one input is (``image`` / ``sequence``);
    ``prediction``: what one target is (``image`` / ``token``); ``score``: what ``accuracy`` means.
    """

    name: str
    sample: str
    prediction: str
    score: str

    @property
    def is_language(self) -> bool:
        """True for next-token prediction (a language model)."""
        return self.name == "next-token"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of ``outputs`` against ``targets``: ``"mean"`` over every prediction (image or token),
        ``"sum"`` over every prediction, ``"none"`` one value per sample (per sequence: its mean over
        positions)."""
        self.check(outputs, targets)
        out = cross_entropy(outputs, targets, reduction)
        return out.flatten(1).mean(1) if reduction == "none" and targets.dim() > 1 else out

    def per_position(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every prediction, shaped like ``targets`` (``(B, T)`` for a language model)."""
        self.check(outputs, targets)
        return cross_entropy(outputs, targets, "none")

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many predictions are right (the top logit is the target), a 0-d tensor on the device."""
        return (outputs.argmax(-1) == targets).sum()

    def predictions(self, targets: torch.Tensor) -> int:
        """How many predictions ``targets`` holds: images, or tokens."""
        return targets.numel()

    def metrics(self, loss_sum: float, correct: float, count: int) -> dict[str, float]:
        """``loss`` and ``accuracy`` (and ``perplexity`` for a language model) from sums over ``count``
        predictions."""
        if count == 0:
            out = {"loss": float("nan"), "accuracy": float("nan")}
        else:
            out = {"loss": loss_sum / count, "accuracy": correct / count}
        if self.is_language:
            out["perplexity"] = math.exp(min(out["loss"], 700.0)) if math.isfinite(out["loss"]) else float("nan")
        return out

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Raise a one-line error when ``outputs`` cannot be scored against ``targets`` under this task
        (an image classifier given token sequences, or the reverse)."""
        if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
            what = (
                "next-token logits (batch, positions, vocabulary)"
                if self.is_language
                else "class logits (batch, classes)"
            )
            raise ResinspectError(
                f"the task is {self.name}: the model must output {what} for targets shaped "
                f"{tuple(targets.shape)}, but it gave {tuple(outputs.shape)}"
                + (" (a language-model dataset needs a language model)" if self.is_language else "")
            )


CLASSIFICATION = Task("classification", "image", "image", "accuracy")
NEXT_TOKEN = Task("next-token", "sequence", "token", "next-token accuracy")
TASKS = {t.name: t for t in (CLASSIFICATION, NEXT_TOKEN)}


def task_named(name: str) -> Task:
    """The task called ``name`` (``classification`` or ``next-token``)."""
    if name not in TASKS:
        raise ResinspectError(f"unknown task '{name}'; valid: {', '.join(TASKS)}")
    return TASKS[name]
