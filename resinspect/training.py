"""The training loop. It knows nothing about plugins beyond calling hooks at documented points:

``resinspect_train_start(ctx, trainee)`` before the first step,
``resinspect_after_backward(ctx, step)`` after ``loss.backward()`` and before
``optimizer.step()`` (gradients exist, parameters are still the old ones),
``resinspect_epoch_end(ctx, epoch)`` after each epoch's test evaluation and
``resinspect_train_end(ctx, trainee)`` after the last epoch. When no plugin
implements a hook it is not called at all.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .distributed import SINGLE, Distributed
from .errors import ResinspectError, TrainingDiverged
from .probes import eval_mode
from .task import CLASSIFICATION, Task

__all__ = [
    "TrainConfig",
    "Trainee",
    "StepInfo",
    "EpochInfo",
    "History",
    "train_model",
    "evaluate",
    "resolve_device",
    "eval_mode",
]  # eval_mode lives in probes; kept importable here


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
    sync_bn: bool = False
    seed: int = 0

    @property
    def initial_lr(self) -> float:
        """The learning rate training starts from: ``lr``, or the optimiser's default when it is None."""
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

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


def _global_sums(
    dist: Distributed, loss_sum: torch.Tensor, correct: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A loss sum, a count of correct predictions and an image count, added up over the ranks in one
    collective (counts are exact in float64)."""
    n = torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)
    total = dist.all_reduce(torch.stack([loss_sum, correct.double(), n]))
    return total[0], total[1].long(), int(total[2].item())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, dist: Distributed = SINGLE, task: Task = CLASSIFICATION
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``loader`` under ``task`` (per image, or per token with perplexity
    for a language model), accumulated as sums (under torchrun each rank takes its share of the batches and
    the sums are added up). Mode is restored."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    with eval_mode(model):
        for x, y in dist.shard(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss_sum += task.loss(logits, y, reduction="sum").double()
            correct += task.correct(logits, y)
            count += task.predictions(y)
    if dist.enabled:
        loss_sum, correct, count = _global_sums(dist, loss_sum, correct, count)
    return task.metrics(loss_sum.item(), correct.item(), count)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.initial_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.initial_lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


class _Progress:
    """The training progress bar (tqdm, on stderr); nothing at all when disabled."""

    def __init__(self, enabled: bool, role: str, epochs: int, steps: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=epochs * steps, desc=f"train {role}", unit="step", file=sys.stderr, dynamic_ncols=True, leave=True
            )

    def update(self, epoch: int, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", refresh=False)

    def epoch_done(self, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(epoch=metrics["epoch"], test_acc=f"{metrics['test_accuracy']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    cfg: TrainConfig,
    device: torch.device,
    *,
    role: str = "model",
    hooks: HookCaller | None = None,
    ctx: Any = None,
    writer: Any = None,
    progress: bool = False,
    on_epoch_end: Any = None,
    dist: Distributed = SINGLE,
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    The data order comes from ``train_loader``'s generator, which is reseeded
    with ``cfg.seed`` here, so a twin trained with the same config sees the
    same batches in the same order. ``on_epoch_end(model, metrics)`` is called
    after every good epoch (the CLI saves the checkpoint there). A NaN or
    infinite loss raises :class:`TrainingDiverged` after restoring the weights
    of the last good epoch.

    Under torchrun (``dist`` enabled) the model is wrapped in DistributedDataParallel for the steps: each
    rank trains on its share of every batch (``train_loader`` has a DistributedSampler and the per-rank batch
    size), gradients are averaged across ranks, losses and accuracies are the global ones, and before every
    evaluation the ranks' BatchNorm running statistics are averaged.
    """
    cfg.validate()
    loop = _Loop(model, train_loader, test_loader, cfg, device, role, hooks, ctx, writer, progress, on_epoch_end, dist)
    try:
        loop.call("resinspect_train_start", trainee=loop.trainee)
        for epoch in range(cfg.epochs):
            loop.epoch(epoch)
        loop.call("resinspect_train_end", trainee=loop.trainee)
    finally:
        loop.bar.close()
        if loop.restore_bn is not None:
            loop.restore_bn()
    loop.history.seconds = time.perf_counter() - loop.start
    model.eval()
    return loop.history


def sync_batchnorm(model: nn.Module) -> Any:
    """Replace every BatchNorm module of ``model`` in place by a SyncBatchNorm that shares its parameters and
    statistics tensors; returns the function that puts the original modules back (the analyses then see the
    model as it was built, with the trained values)."""
    originals = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm)
    ]
    for parent, name, child in originals:
        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))

    def restore() -> None:
        for parent, name, child in originals:
            setattr(parent, name, child)

    return restore


def _copy_state(into: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Copy the model's state into the tensors of ``into`` (same keys and shapes), without allocating."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            into[k].copy_(v)


class _Loop:
    """The state of one network's training: optimiser, schedule, history, last good weights."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        test_loader: DataLoader,
        cfg: TrainConfig,
        device: torch.device,
        role: str,
        hooks: HookCaller | None,
        ctx: Any,
        writer: Any,
        progress: bool,
        on_epoch_end: Any,
        dist: Distributed = SINGLE,
    ):
        generator = getattr(train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model, self.train_loader, self.test_loader = model.to(device), train_loader, test_loader
        self.dist = dist
        self.forward = model
        self.restore_bn = None
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if cfg.sync_bn:
                if device.type != "cuda":
                    raise ResinspectError(
                        "--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); on CPU "
                        "each process normalises with its own share of the batch"
                    )
                self.restore_bn = sync_batchnorm(model)
            # each rank keeps its own BatchNorm running statistics; they are averaged at the end of each epoch
            self.forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.cfg, self.device, self.role, self.hooks, self.ctx = cfg, device, role, hooks, ctx
        self.task: Task = getattr(ctx, "task", CLASSIFICATION)  # the run's task (RunContext.task), by its data
        self.writer, self.on_epoch_end = writer, on_epoch_end
        self.optimizer = _optimizer(model, cfg)
        steps = len(train_loader)
        self.per_step_schedule = cfg.schedule == "cosine"
        self.scheduler = _scheduler(self.optimizer, cfg, cfg.epochs * steps if self.per_step_schedule else cfg.epochs)
        self.trainee = Trainee(role, model, self.optimizer, cfg.epochs, steps)
        self.history = History()
        self.bar = _Progress(progress, role, cfg.epochs, steps)
        # the last good weights, copied into one preallocated set of tensors at each epoch end
        self.last_good = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.start = time.perf_counter()
        self.global_step = 0

    def call(self, hook: str, **kwargs: Any) -> None:
        if self.hooks is not None and self.hooks.has(hook):
            self.hooks.call(hook, ctx=self.ctx, **kwargs)

    def epoch(self, epoch: int) -> None:
        model, device = self.model, self.device
        sampler = getattr(self.train_loader, "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = self.step(epoch, i, x, y)
            loss_sum += loss.double() * self.task.predictions(y)
            correct += self.task.correct(logits, y)
            seen += self.task.predictions(y)
        if self.scheduler is not None and not self.per_step_schedule:
            self.scheduler.step()
        if self.dist.enabled:
            loss_sum, correct, seen = _global_sums(self.dist, loss_sum, correct, seen)
            self.dist.average_buffers(model)
        test = evaluate(model, self.test_loader, device, self.dist, self.task)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / max(1, seen),
            "train_accuracy": correct.item() / max(1, seen),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            **({"test_perplexity": test["perplexity"]} if "perplexity" in test else {}),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - self.start,
        }
        self.history.epochs.append(metrics)
        self.bar.epoch_done(metrics)
        if self.writer is not None:
            for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
                self.writer.add_scalar(f"train/{k}", metrics[k], epoch + 1)
        _copy_state(self.last_good, model)
        if self.on_epoch_end is not None:
            self.on_epoch_end(model, metrics)
        self.call("resinspect_epoch_end", epoch=EpochInfo(self.role, model, epoch + 1, metrics))

    def step(self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.forward(x)
        loss = self.task.loss(logits, y)
        loss.backward()
        # under torchrun: the mean over the whole (global) batch, the same on every rank, so that every rank
        # stops together if it is not finite
        loss_value = (
            (self.dist.all_reduce(loss.detach()) / self.dist.world_size).item() if self.dist.enabled else loss.item()
        )
        if not math.isfinite(loss_value):
            self.model.load_state_dict(self.last_good)
            good = f"the weights of epoch {epoch}, the last good one" if epoch else "its initial weights"
            raise TrainingDiverged(
                f"{self.role}: the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; training stopped. "
                f"The model keeps {good}. Try a smaller --lr.",
                self.history,
            )
        self.call(
            "resinspect_after_backward", step=StepInfo(self.role, self.model, epoch, self.global_step, loss.detach())
        )
        self.optimizer.step()
        if self.scheduler is not None and self.per_step_schedule:
            self.scheduler.step()
        self.history.step_losses.append(loss_value)
        self.global_step += 1
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss_value, self.global_step)
        self.bar.update(epoch, i + 1, loss_value)
        return loss.detach(), logits.detach()
