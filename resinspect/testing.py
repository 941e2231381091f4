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

from .anatomy import is_chained, residual_blocks, site_modules
from .context import RunContext
from .data import DataBundle, load_data, make_loaders
from .models import build_model
from .section import Section

__all__ = [
    "TwoBlockNet",
    "tiny_data",
    "make_context",
    "run_plugin",
    "hook_count",
    "overridden_forwards",
    "check_contract",
    "CONTRACT_MODELS",
]


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
            self.head.weight.copy_(
                torch.arange(num_classes * in_features, dtype=torch.float32).reshape(num_classes, in_features)
                / (num_classes * in_features)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.flatten(x))))


def tiny_data(train: int = 256, test: int = 128, size: int = 8) -> DataBundle:
    """The digits dataset at ``size``×``size``, cut to ``train``/``test`` images (fast to train on)."""
    full = load_data("digits", size=size)
    tx, ty = full.train.tensors  # type: ignore[attr-defined]  # (digits is a TensorDataset)
    vx, vy = full.test.tensors  # type: ignore[attr-defined]
    return DataBundle(
        name="digits",
        train=torch.utils.data.TensorDataset(tx[:train], ty[:train]),
        test=torch.utils.data.TensorDataset(vx[:test], vy[:test]),
        in_channels=1,
        image_size=size,
        num_classes=10,
        class_names=full.class_names,
        info={"size": size, "subset": [train, test]},
    )


def _resolved_options(options: dict[str, dict[str, Any]] | list[str] | None) -> dict[str, dict[str, Any]]:
    """Every installed plugin's options with their defaults, overridden by ``options`` (nested by plugin,
    or ``"plugin.name=value"`` strings: the shapes :func:`resinspect.run` accepts)."""
    from .plugins import PluginHost

    registry = PluginHost().option_registry()
    if isinstance(options, dict):
        return registry.resolve(options, [])
    return registry.resolve({}, list(options or []))


def make_context(
    model: str | nn.Module = "resnet20",
    data: DataBundle | None = None,
    twin: str | None = None,
    run_dir: str | Path | None = None,
    options: dict[str, dict[str, Any]] | list[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    plugin: str | None = None,
) -> RunContext:
    """A ready :class:`RunContext` on CPU (untrained model; TensorBoard off).

    ``options`` has the shape :func:`resinspect.run` takes (``{"ablation": {"samples": 10}}`` or
    ``["ablation.samples=10"]``); every installed plugin's defaults are applied first. ``plugin`` makes
    ``ctx.options()`` (without a name) answer for that plugin, as it does inside its hooks. Without
    ``run_dir`` the context writes into a temporary folder that is removed when the process exits.
    """
    data = data or tiny_data()
    torch.manual_seed(seed)
    net = build_model(model, data.in_channels, data.num_classes, data.image_size) if isinstance(model, str) else model
    twin_net = None
    if twin is not None:
        torch.manual_seed(seed)
        twin_net = build_model(twin, data.in_channels, data.num_classes, data.image_size)
    train, test = make_loaders(data, batch_size, seed)
    ctx = RunContext(
        model=net.eval(),
        model_name=model if isinstance(model, str) else type(model).__name__,
        data=data,
        train_loader=train,
        test_loader=test,
        device=torch.device("cpu"),
        run_dir=Path(run_dir) if run_dir is not None else _temporary_dir(),
        twin=twin_net,
        twin_name=twin,
        seed=seed,
        plugin_options=_resolved_options(options),
        plugin=plugin,
    )
    for _, m in ctx.networks():
        m.eval()
    ctx.record_initial_state()
    return ctx


def _temporary_dir() -> Path:
    folder = tempfile.TemporaryDirectory(prefix="resinspect-test-")
    _KEEP.append(folder)  # removed at interpreter exit by TemporaryDirectory's finaliser
    return Path(folder.name)


_KEEP: list[tempfile.TemporaryDirectory] = []


def run_plugin(
    plugin: str,
    model: str | nn.Module = "resnet20",
    data: DataBundle | None = None,
    epochs: int = 1,
    twin: bool = False,
    options: dict[str, dict[str, Any]] | list[str] | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> Section:
    """Run one plugin end to end through :func:`resinspect.run` and return its (first) section.

    ``options`` has the shape :func:`resinspect.run` takes. Without ``out`` the run directory is a temporary
    folder deleted before this returns (the section and ``section.run_result`` stay in memory); pass
    ``out`` to keep the files. Raises ``AssertionError`` with the plugin's traceback if it failed.
    """
    from .runner import run

    with tempfile.TemporaryDirectory(prefix="resinspect-test-") as tmp:
        result = run(
            model=model,
            data=data or tiny_data(),
            plugins=[plugin],
            epochs=epochs,
            twin=twin,
            options=options,
            out=out or tmp,
            device="cpu",
            seed=seed,
            batch_size=batch_size,
            overwrite=True,
        )
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
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in [*model.modules(), *site_modules(model)]
    )


def overridden_forwards(model: nn.Module) -> list[str]:
    """Modules whose ``forward`` is patched on the instance (should be empty after any analysis)."""
    patched = [name for name, m in model.named_modules() if "forward" in m.__dict__ and not is_chained(m)]
    return patched + [
        f"{type(p).__name__} (a residual site's piece)" for p in site_modules(model) if "forward" in p.__dict__
    ]


CONTRACT_MODELS = ("resnet20", "plain20", "torchvision:resnet18")


def check_contract(
    plugin: str,
    models: tuple[str, ...] = CONTRACT_MODELS,
    options: dict[str, dict[str, Any]] | None = None,
    data: DataBundle | None = None,
) -> None:
    """The contract every resinspect plugin must pass, for third-party packages to run in their own tests.

    For each model (untrained, 1 epoch on a tiny dataset, CPU): the run completes; every section has an
    explanation; the same seed gives the same findings, metrics and tables twice; no hook or patched
    forward is left on the networks, which are back in eval mode (also with a twin); TensorBoard tags lie
    under the plugin's own name (or ``train/``); and when the plugin's analysis raises, the run still
    finishes, marks it failed and leaves the networks clean. Raises ``AssertionError`` naming the breach.
    """
    from .plugins import PluginHost
    from .probes import hooks_left

    data = data or tiny_data(train=64, test=32)
    for model in models:
        with tempfile.TemporaryDirectory(prefix="resinspect-contract-") as tmp:
            first = _contract_run(plugin, model, data, Path(tmp) / "a", options)
            second = _contract_run(plugin, model, data, Path(tmp) / "b", options)
            sections = first.sections[plugin]
            _require(
                sections and all(s.explanation.strip() for s in sections),
                f"{plugin} on {model}: every section needs an explanation",
            )
            _require(
                _comparable(first, plugin) == _comparable(second, plugin),
                f"{plugin} on {model}: two runs with the same seed differ",
            )
            names = {b.name for b in residual_blocks(first.model)}
            for sec in sections:
                for column, values in sec.per_block.items():
                    unknown = sorted(set(values) - names)
                    _require(
                        not unknown,
                        f"{plugin} on {model}: per-block column '{column}' names blocks the model "
                        f"does not have: {unknown[:3]}",
                    )
            left = hooks_left(first.model)
            _require(
                not left and not first.model.training,
                f"{plugin} on {model}: left on the model: {left}"
                f"{' (and the model in train mode)' if first.model.training else ''}",
            )
            tags = _tensorboard_tags(Path(tmp) / "a" / "tb")
            # core groups: training, the dossier and what resinspect.tbtabs writes for the other tabs
            core = ("train", "dossier", "hparams", "pr", "run", "custom_scalars__config__")
            stray = sorted(t for t in tags if t.split("/")[0] not in (plugin, *core))
            _require(not stray, f"{plugin} on {model}: TensorBoard tags outside '{plugin}/': {stray[:5]}")
    with tempfile.TemporaryDirectory(prefix="resinspect-contract-") as tmp:
        twin = _contract_run(plugin, models[0], data, Path(tmp) / "t", options, twin=True)
        for net in (twin.model, twin.twin):
            _require(not hooks_left(net) and not net.training, f"{plugin} with a twin: a network is left unclean")
        host = PluginHost()
        module = host.available[plugin].plugin
        original = getattr(module, "resinspect_analyze", None)

        def boom(ctx):
            raise RuntimeError(f"{plugin} forced failure")

        from .hookspecs import hookimpl

        module.resinspect_analyze = hookimpl(boom)
        try:
            failed = _contract_run(plugin, models[0], data, Path(tmp) / "f", options, host=host)
        finally:
            if original is None:
                delattr(module, "resinspect_analyze")
            else:
                module.resinspect_analyze = original
        _require(
            failed.results.plugins[plugin].status == "failed" and failed.exit_code == 1,
            f"{plugin}: a raising analysis must mark the plugin failed and the exit status non-zero",
        )
        _require(not hooks_left(failed.model), f"{plugin}: hooks left after a forced failure")


def _require(ok: Any, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _contract_run(
    plugin: str, model: str, data: DataBundle, out: Path, options: Any, twin: bool = False, host: Any = None
) -> Any:
    from .runner import run

    result = run(
        model=model,
        data=data,
        plugins=[plugin],
        epochs=1,
        twin=twin,
        device="cpu",
        seed=3,
        out=out,
        options=options,
        batch_size=32,
        host=host,
    )
    if host is None:
        _require(result.status == "complete", f"{plugin} on {model} failed: {result.results.plugins[plugin].traceback}")
    return result


def _comparable(result: Any, plugin: str) -> list[dict[str, Any]]:
    import json

    stored = json.loads((result.run_dir / "results.json").read_text())
    return [
        {k: s[k] for k in ("title", "findings", "metrics", "tables")} for s in stored["plugins"][plugin]["sections"]
    ]


def _tensorboard_tags(root: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer(size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    return {
        t
        for run in mux.Runs().values()
        for kind in ("scalars", "images", "histograms", "tensors")
        for t in run.get(kind, [])
    }
