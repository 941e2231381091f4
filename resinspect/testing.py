"""Helpers for testing resinspect plugins: tiny models with known answers, a ready RunContext, and a
one-call way to run a plugin end to end.

    from resinspect.testing import run_plugin
    section = run_plugin("myplugin", model="resnet20", epochs=1)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .context import RunContext
from .data import DataBundle, load_data, make_loaders
from .models import build_model
from .section import Section

__all__ = ["TwoBlockNet", "tiny_data", "make_context", "run_plugin", "hook_count", "overridden_forwards"]


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.f = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class TwoBlockNet(nn.Module):
    """``y = head(b2(b1(x)))`` with ``b_i(x) = x + W_i x`` on flattened input, fixed weights.

    Everything is linear, so every quantity has a closed form: with
    ``W1 = a·I`` and ``W2 = b·I`` the clean output is ``H(1+a)(1+b)x``, bypassing
    block 1 gives ``H(1+b)x`` and dropping its skip gives ``H·a(1+b)x``.
    """

    def __init__(self, in_features: int = 4, num_classes: int = 2, a: float = 0.5, b: float = -0.25):
        super().__init__()
        self.flatten = nn.Flatten()
        self.b1, self.b2 = _Block(in_features), _Block(in_features)
        self.head = nn.Linear(in_features, num_classes, bias=False)
        with torch.no_grad():
            self.b1.f.weight.copy_(a * torch.eye(in_features))
            self.b2.f.weight.copy_(b * torch.eye(in_features))
            self.head.weight.copy_(torch.arange(num_classes * in_features, dtype=torch.float32)
                                   .reshape(num_classes, in_features) / (num_classes * in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.flatten(x))))


def tiny_data(train: int = 256, test: int = 128, size: int = 8) -> DataBundle:
    """The digits dataset at ``size``×``size``, cut to ``train``/``test`` images (fast to train on)."""
    full = load_data("digits", size=size)
    tx, ty = full.train.tensors
    vx, vy = full.test.tensors
    return DataBundle(name="digits", train=torch.utils.data.TensorDataset(tx[:train], ty[:train]),
                      test=torch.utils.data.TensorDataset(vx[:test], vy[:test]), in_channels=1, image_size=size,
                      num_classes=10, class_names=full.class_names, info={"size": size, "subset": [train, test]})


def make_context(model: str | nn.Module = "resnet20", data: DataBundle | None = None, twin: str | None = None,
                 run_dir: str | Path | None = None, options: dict[str, dict[str, Any]] | None = None,
                 seed: int = 0, batch_size: int = 64) -> RunContext:
    """A ready :class:`RunContext` on CPU (untrained model; no TensorBoard writer)."""
    data = data or tiny_data()
    torch.manual_seed(seed)
    net = build_model(model, data.in_channels, data.num_classes, data.image_size) if isinstance(model, str) else model
    twin_net = None
    if twin is not None:
        torch.manual_seed(seed)
        twin_net = build_model(twin, data.in_channels, data.num_classes, data.image_size)
    train, test = make_loaders(data, batch_size, seed)
    ctx = RunContext(model=net.eval(), model_name=model if isinstance(model, str) else type(model).__name__,
                     data=data, train_loader=train, test_loader=test, device=torch.device("cpu"),
                     run_dir=Path(run_dir or tempfile.mkdtemp(prefix="resinspect-test-")), twin=twin_net,
                     twin_name=twin, seed=seed, plugin_options=options or {})
    for _, m in ctx.networks():
        m.eval()
    ctx.record_initial_state()
    return ctx


def run_plugin(plugin: str, model: str | nn.Module = "resnet20", data: DataBundle | None = None,
               epochs: int = 1, twin: bool = False, options: dict[str, Any] | None = None,
               out: str | Path | None = None, seed: int = 0, batch_size: int = 64) -> Section:
    """Run one plugin end to end through :func:`resinspect.run` and return its (first) section.

    Raises ``AssertionError`` with the plugin's traceback if it failed.
    """
    from .runner import run

    result = run(model=model, data=data or tiny_data(), plugins=[plugin], epochs=epochs, twin=twin,
                 options={plugin.rsplit(".", 1)[-1]: options} if options else None,
                 out=out or tempfile.mkdtemp(prefix="resinspect-test-"), device="cpu", seed=seed,
                 batch_size=batch_size, overwrite=True)
    name = next(iter(result.sections))
    sections = result.sections[name]
    if not sections:
        raise AssertionError(f"plugin {plugin} returned no section")
    if sections[0].status == "failed":
        raise AssertionError(f"plugin {plugin} failed: {sections[0].error}\n{sections[0].traceback}")
    sections[0].run_result = result  # type: ignore[attr-defined]
    return sections[0]


def hook_count(model: nn.Module) -> int:
    """Forward/backward hooks attached anywhere in ``model`` (should be 0 after any analysis)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def overridden_forwards(model: nn.Module) -> list[str]:
    """Modules whose ``forward`` is patched on the instance (should be empty after any analysis)."""
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]
