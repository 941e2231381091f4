"""The training loop. It knows nothing about plugins beyond calling hooks at documented points:

``resinspect_train_start(ctx, trainee)`` before the first step,
``resinspect_after_backward(ctx, step)`` after ``loss.backward()`` and before
``optimizer.step()`` (gradients exist, parameters are still the old ones),
``resinspect_epoch_end(ctx, epoch)`` after each epoch's test evaluation and
``resinspect_train_end(ctx, trainee)`` after the last epoch. When no plugin
implements a hook it is not called at all.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .errors import TrainingDiverged

__all__ = ["TrainConfig", "Trainee", "StepInfo", "EpochInfo", "History", "train_model", "evaluate",
           "resolve_device", "eval_mode"]


@dataclass
class TrainConfig:
    """How to train. ``lr=None`` picks 1e-3 for Adam and 0.1 for SGD."""

    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 3
    gamma: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got '{self.optimizer}'")
        if self.schedule not in ("cosine", "step", "none"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'none', got '{self.schedule}'")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Trainee:
    """The network being trained: ``role`` is ``"model"`` or ``"twin"``."""

    role: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int


@dataclass
class StepInfo:
    """One optimisation step, passed to ``resinspect_after_backward``. ``loss`` stays on the device."""

    role: str
    model: nn.Module
    epoch: int
    step: int
    loss: torch.Tensor


@dataclass
class EpochInfo:
    """One finished epoch, passed to ``resinspect_epoch_end``."""

    role: str
    model: nn.Module
    epoch: int
    metrics: dict[str, float]


@dataclass
class History:
    """Per-epoch metrics and per-step training losses."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final(self) -> dict[str, float]:
        return dict(self.epochs[-1]) if self.epochs else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HookCaller(Protocol):
    def has(self, hook: str) -> bool: ...
    def call(self, hook: str, **kwargs: Any) -> list[Any]: ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; on exit give every submodule back exactly the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}'; valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``loader``, accumulated as sums. Mode is restored."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += len(y)
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return {"loss": loss_sum.item() / count, "accuracy": correct.item() / count}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr or 0.1, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr or 1e-3, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


class _Progress:
    def __init__(self, enabled: bool, role: str, epochs: int, steps: int):
        self.enabled, self.role, self.epochs, self.steps = enabled, role, epochs, steps

    def update(self, epoch: int, step: int, loss: float) -> None:
        if self.enabled:
            done = int(20 * step / max(1, self.steps))
            sys.stderr.write(f"\r{self.role:>5} epoch {epoch + 1}/{self.epochs} [{'#' * done:<20}] "
                             f"{step}/{self.steps} loss {loss:.4f}")
            sys.stderr.flush()

    def epoch_done(self, metrics: dict[str, float]) -> None:
        if self.enabled:
            sys.stderr.write(f"  test acc {metrics['test_accuracy']:.3f}\n")


def train_model(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, cfg: TrainConfig,
                device: torch.device, *, role: str = "model", hooks: HookCaller | None = None,
                ctx: Any = None, writer: Any = None, progress: bool = False,
                on_epoch_end: Any = None) -> History:
    """Train ``model`` in place and return its :class:`History`.

    The data order comes from ``train_loader``'s generator, which is reseeded
    with ``cfg.seed`` here, so a twin trained with the same config sees the
    same batches in the same order. ``on_epoch_end(model, metrics)`` is called
    after every good epoch (the CLI saves the checkpoint there). A NaN or
    infinite loss raises :class:`TrainingDiverged` after restoring the weights
    of the last good epoch.
    """
    cfg.validate()
    generator = getattr(train_loader, "generator", None)
    if generator is not None:
        generator.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    scheduler = _scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch if cfg.schedule == "cosine" else cfg.epochs)
    per_step_schedule = cfg.schedule == "cosine"
    has = (lambda h: hooks is not None and hooks.has(h))
    trainee = Trainee(role, model, optimizer, cfg.epochs, steps_per_epoch)
    history = History()
    bar = _Progress(progress, role, cfg.epochs, steps_per_epoch)
    last_good = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    if has("resinspect_train_start"):
        hooks.call("resinspect_train_start", ctx=ctx, trainee=trainee)
    global_step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                model.load_state_dict(last_good)
                good = f"the weights of epoch {epoch}, the last good one" if epoch else "its initial weights"
                raise TrainingDiverged(
                    f"{role}: the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; training stopped. "
                    f"The model keeps {good}. Try a smaller --lr.", history)
            if has("resinspect_after_backward"):
                hooks.call("resinspect_after_backward", ctx=ctx,
                           step=StepInfo(role, model, epoch, global_step, loss.detach()))
            optimizer.step()
            if scheduler is not None and per_step_schedule:
                scheduler.step()
            history.step_losses.append(loss_value)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            global_step += 1
            if writer is not None:
                writer.add_scalar(f"train/{role}/loss", loss_value, global_step)
            bar.update(epoch, i + 1, loss_value)
        if scheduler is not None and not per_step_schedule:
            scheduler.step()
        test = evaluate(model, test_loader, device)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, seen),
                   "train_accuracy": correct.item() / max(1, seen), "test_loss": test["loss"],
                   "test_accuracy": test["accuracy"], "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - start}
        history.epochs.append(metrics)
        bar.epoch_done(metrics)
        if writer is not None:
            for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
                writer.add_scalar(f"train/{role}/{k}", metrics[k], epoch + 1)
        last_good = copy.deepcopy(model.state_dict())
        if on_epoch_end is not None:
            on_epoch_end(model, metrics)
        if has("resinspect_epoch_end"):
            hooks.call("resinspect_epoch_end", ctx=ctx, epoch=EpochInfo(role, model, epoch + 1, metrics))
    if has("resinspect_train_end"):
        hooks.call("resinspect_train_end", ctx=ctx, trainee=trainee)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
