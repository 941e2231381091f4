"""One run: validate everything, build data and model(s), train with hooks, analyse, write the run directory.

``resinspect run`` and ``resinspect.run(...)`` both end up in :func:`run`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .anatomy import block_table, residual_blocks
from .context import RunContext
from .data import DataBundle, load_data, make_loaders
from .errors import CheckpointError, ResinspectError, TrainingDiverged
from .models import build_model, load_checkpoint, save_checkpoint, twin_name
from .plugins import DEFAULT_PLUGINS, PluginHost
from .rundir import SCHEMA_VERSION, dump_toml, new_run_dir, read_config_file, results_json, save_results, write_atomic
from .section import Section, pyplot
from .training import History, TrainConfig, eval_mode, resolve_device, train_model

__all__ = ["run", "RunResult", "RunSettings", "settings_from_config"]

_PACKAGES = ("torch", "torchvision", "captum", "tensorboard", "torchinfo", "pluggy", "seaborn", "matplotlib",
             "numpy")
_RUN_KEYS = {"model", "data", "data_root", "download", "plugins", "epochs", "twin", "device", "seed", "out",
             "checkpoint", "reports_root"}
_RESERVED_TABLES = {"run", "train", "data"}
DEFAULT_EPOCHS = 8


@dataclass
class RunSettings:
    """Everything that defines a run (what config.toml stores)."""

    model: str = "resnet20"
    data: str = "digits"
    data_args: dict[str, Any] = field(default_factory=dict)
    data_root: str = "data"
    download: bool = False
    plugins: list[str] = field(default_factory=lambda: list(DEFAULT_PLUGINS))
    epochs: int | None = None  # None: 8, or 0 when a checkpoint is loaded (resolved by run())
    twin: bool = False
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    reports_root: str = "reports"
    checkpoint: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    plugin_tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_toml_dict(self, plugin_options: dict[str, dict[str, Any]]) -> dict[str, Any]:
        run = {k: getattr(self, k) for k in ("model", "data", "data_root", "download", "plugins", "epochs", "twin",
                                             "device", "seed", "checkpoint")}
        train = dataclasses.asdict(self.train)
        train.pop("epochs")
        train.pop("seed")
        out: dict[str, Any] = {"run": run, "train": train, "data": dict(self.data_args)}
        for name in self.plugins:
            if plugin_options.get(name):
                out[name] = plugin_options[name]
        return out


def settings_from_config(path: str | Path | None, base: RunSettings | None = None) -> RunSettings:
    """Read a ``--config`` TOML file: ``[run]``, ``[train]``, ``[data]`` and one table per plugin."""
    s = base or RunSettings()
    if path is None:
        return s
    cfg = read_config_file(path)
    run = cfg.get("run", {})
    unknown = sorted(set(run) - _RUN_KEYS)
    if unknown:
        raise ResinspectError(f"config {path}: unknown key(s) in [run]: {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(_RUN_KEYS))}")
    for k, v in run.items():
        setattr(s, k, list(v) if k == "plugins" else v)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(cfg.get("train", {})) - train_fields)
    if bad:
        raise ResinspectError(f"config {path}: unknown key(s) in [train]: {', '.join(bad)}; "
                              f"valid: {', '.join(sorted(train_fields))}")
    s.train = dataclasses.replace(s.train, **cfg.get("train", {}))
    s.data_args = dict(cfg.get("data", {}))
    s.plugin_tables = {k: v for k, v in cfg.items() if k not in _RESERVED_TABLES}
    return s


@dataclass
class RunResult:
    """What a run produced. ``exit_code`` is 0 only when the run and every plugin succeeded."""

    run_dir: Path
    results: dict[str, Any]
    sections: dict[str, list[Section]]
    model: nn.Module
    twin: nn.Module | None = None

    @property
    def status(self) -> str:
        return self.results["status"]

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "complete" else 1

    def section(self, plugin: str) -> Section:
        return self.sections[plugin][0]


def _environment(device: torch.device) -> dict[str, Any]:
    packages = {}
    for p in _PACKAGES:
        try:
            packages[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "packages": packages}


def _bundle_from_loaders(loaders: Sequence[DataLoader], model: nn.Module | None) -> DataBundle:
    train, test = loaders
    x, y = next(iter(train))
    num_classes = int(max(int(y.max()) + 1, 2))
    if model is not None:
        with torch.no_grad(), eval_mode(model):
            num_classes = model(x[:2].to(next(model.parameters()).device)).shape[1]
    return DataBundle(name="custom", train=train.dataset, test=test.dataset, in_channels=x.shape[1],
                      image_size=x.shape[-1], num_classes=num_classes,
                      class_names=[str(i) for i in range(num_classes)], info={"source": "DataLoader pair"})


def _training_section(history: dict[str, History]) -> Section:
    plt = pyplot()

    s = Section(title="Training", plugin="core", docs="explainer-degradation",
                explanation="Loss per step and test accuracy per epoch of the model"
                            + (" and its plain twin (same layers without shortcuts, same data order and seed)."
                               if "twin" in history else "."))
    rows = []
    for role, h in history.items():
        for e in h.epochs:
            rows.append([role, e["epoch"], e["train_loss"], e["train_accuracy"], e["test_loss"], e["test_accuracy"],
                         e["lr"]])
        if h.epochs:
            s.metrics[f"{role}/test_accuracy"] = h.epochs[-1]["test_accuracy"]
            s.metrics[f"{role}/train_loss"] = h.epochs[-1]["train_loss"]
    if rows:
        s.table("Per-epoch metrics", ["network", "epoch", "train loss", "train acc", "test loss", "test acc", "lr"],
                rows)
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
        for role, h in history.items():
            a.plot(h.step_losses, label=role, lw=1)
            b.plot([e["epoch"] for e in h.epochs], [e["test_accuracy"] for e in h.epochs], marker="o", label=role)
        a.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss per step")
        b.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy", ylim=(0, 1.02))
        a.legend(), b.legend()
        s.figure(fig, "Training curves", "Left: training loss per step (log scale). Right: test accuracy per epoch.")
    if "twin" in history and history["twin"].epochs and history["model"].epochs:
        gap = history["model"].epochs[-1]["test_accuracy"] - history["twin"].epochs[-1]["test_accuracy"]
        s.finding(f"After {len(history['model'].epochs)} epochs the residual network reaches "
                  f"{history['model'].epochs[-1]['test_accuracy']:.1%} test accuracy and its plain twin "
                  f"{history['twin'].epochs[-1]['test_accuracy']:.1%} ({gap * 100:+.1f} points for the shortcuts).",
                  "good" if gap > 0.02 else "info")
    return s


def run(model: str | nn.Module | None = None, data: str | DataBundle | Sequence[DataLoader] | None = None,
        plugins: Iterable[str] | None = None, *, epochs: int | None = None, twin: bool | nn.Module = False,
        out: str | Path | None = None, device: str | None = None, seed: int | None = None,
        options: dict[str, dict[str, Any]] | Iterable[str] | None = None, checkpoint: str | Path | None = None,
        config: str | Path | None = None, settings: RunSettings | None = None, progress: bool = False,
        overwrite: bool = False, host: PluginHost | None = None, **train_kwargs: Any) -> RunResult:
    """Train (or load) a model, run analysis plugins on it, and write a run directory.

    Args:
        model: a model name (``"resnet20"``, ``"torchvision:resnet18"``, ``"pkg.mod:fn"``) or an
            ``nn.Module`` that exists only in memory.
        data: a dataset name, a :class:`DataBundle`, or a ``(train_loader, test_loader)`` pair.
        plugins: plugin names (or module paths / ``.py`` files); default: the default set.
        epochs: training epochs (0 analyses the model as it is).
        twin: also train the plain twin (``True``), or a given twin module.
        out: the run directory (default: a new folder under ``reports/``).
        options: ``{"ablation": {"samples": 100}}`` or ``["ablation.samples=100"]``.
        checkpoint: load the model from this checkpoint instead of building it.
        config: a TOML config file (values given here override it).
        train_kwargs: any :class:`TrainConfig` field (``lr=...``, ``batch_size=...``).

    Returns a :class:`RunResult`; ``result.exit_code`` is non-zero if anything failed.
    """
    s = settings_from_config(config, settings or RunSettings())
    if isinstance(model, str):
        s.model = model
    if isinstance(data, str):
        s.data = data
    if plugins is not None:
        s.plugins = [plugins] if isinstance(plugins, str) else list(plugins)
    for key, value in (("epochs", epochs), ("out", out), ("device", device), ("seed", seed),
                       ("checkpoint", checkpoint)):
        if value is not None:
            setattr(s, key, str(value) if key in ("out", "checkpoint") else value)
    if twin is True:
        s.twin = True
    if s.epochs is None:  # a loaded model is analysed as it is unless epochs are asked for
        s.epochs = 0 if s.checkpoint else DEFAULT_EPOCHS
    if train_kwargs:
        unknown = sorted(set(train_kwargs) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise TypeError(f"run() got unknown argument(s) {', '.join(unknown)}")
        s.train = dataclasses.replace(s.train, **train_kwargs)
    s.train = dataclasses.replace(s.train, epochs=s.epochs, seed=s.seed)
    s.train.validate()
    cli_pairs: list[str] = []
    tables = dict(s.plugin_tables)
    if isinstance(options, dict):
        for plugin, values in options.items():
            tables[plugin] = {**tables.get(plugin, {}), **values}
    elif options is not None:
        cli_pairs = list(options)

    # --- validate everything before any work ------------------------------------------------
    host = host or PluginHost()
    s.plugins = host.activate(s.plugins)
    plugin_options = host.option_registry().resolve(tables, cli_pairs)
    dev = resolve_device(s.device)
    started = time.perf_counter()
    started_at = dt.datetime.now().isoformat(timespec="seconds")

    if isinstance(data, DataBundle):
        bundle = data
    elif data is not None and not isinstance(data, str):
        bundle = _bundle_from_loaders(list(data), model if isinstance(model, nn.Module) else None)
    else:
        bundle = load_data(s.data, root=s.data_root, download=s.download, **s.data_args)
    s.data = bundle.name
    arch_kwargs = {"in_channels": bundle.in_channels, "num_classes": bundle.num_classes,
                   "image_size": bundle.image_size}

    twin_model: nn.Module | None = twin if isinstance(twin, nn.Module) else None
    twin_label: str | None = type(twin_model).__name__ if twin_model is not None else None
    if isinstance(model, nn.Module):
        net, model_label = model, type(model).__name__
        s.model = model_label
        if s.twin and twin_model is None:
            raise ResinspectError("twin=True needs a named model; for an in-memory model pass twin=<plain module>")
    elif s.checkpoint:
        net, payload = load_checkpoint(s.checkpoint, allow_factory=s.model if ":" in s.model else None)
        model_label = payload["arch"]
        saved = payload["arch_kwargs"]
        for key in ("in_channels", "num_classes"):
            if key in saved and saved[key] != arch_kwargs[key]:
                raise CheckpointError(
                    f"checkpoint {s.checkpoint}: the model was built for {saved.get('in_channels')} input channel(s) "
                    f"and {saved.get('num_classes')} classes (dataset {payload.get('dataset', {}).get('name', '?')}); "
                    f"dataset '{bundle.name}' has {bundle.in_channels} channel(s) and {bundle.num_classes} classes")
        s.model = model_label
    else:
        torch.manual_seed(s.seed)
        net, model_label = build_model(s.model, **arch_kwargs), s.model
    if s.twin and twin_model is None:
        twin_label = twin_name(model_label)
        if twin_label is None:
            raise ResinspectError(f"model '{model_label}' has no plain twin; twins exist for the CIFAR ResNets "
                                  "(resnet20 … resnet110) and seed34")
        torch.manual_seed(s.seed)
        twin_model = build_model(twin_label, **arch_kwargs)
        if s.checkpoint and s.epochs <= 0:
            # an untrained twin would make every comparison meaningless: use the one saved with the model
            twin_ckpt = Path(s.checkpoint).with_name("twin.pt")
            if not twin_ckpt.exists():
                raise ResinspectError(f"--twin with --checkpoint {s.checkpoint}: no trained twin at {twin_ckpt} "
                                      "(it is saved by runs with --twin); train it with --epochs N instead")
            twin_model, _ = load_checkpoint(twin_ckpt, model=twin_model)
    if isinstance(data, (list, tuple)):
        train_loader, test_loader = data
    else:
        train_loader, test_loader = make_loaders(bundle, s.train.batch_size, s.seed)

    run_dir = new_run_dir(s.out, s.reports_root, f"{model_label}-{bundle.name}", overwrite=overwrite)
    config_toml = dump_toml(s.to_toml_dict(plugin_options))
    write_atomic(run_dir / "config.toml", config_toml)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    net.to(dev)
    if twin_model is not None:
        twin_model.to(dev)
    ctx = RunContext(model=net, model_name=model_label, data=bundle, train_loader=train_loader,
                     test_loader=test_loader, device=dev, run_dir=run_dir, writer=writer, twin=twin_model,
                     twin_name=twin_label, seed=s.seed, config=dataclasses.asdict(s), plugin_options=plugin_options)
    ctx.record_initial_state()

    results: dict[str, Any] = {
        "schema": "resinspect.results", "schema_version": SCHEMA_VERSION, "resinspect_version": __version__,
        "status": "running", "error": None,
        "run": {"name": run_dir.name, "dir": str(run_dir), "started": started_at},
        "config": {**ctx.config, "plugin_options": plugin_options},
        "environment": _environment(dev),
        "model": {"name": model_label, "parameters": sum(p.numel() for p in net.parameters()),
                  "residual_blocks": block_table(residual_blocks(net)),
                  "checkpoint": s.checkpoint,
                  "twin": None if twin_model is None else {
                      "name": twin_label, "parameters": sum(p.numel() for p in twin_model.parameters()),
                      "residual_blocks": len(residual_blocks(twin_model))}},
        "data": bundle.describe(), "training": {}, "plugins": {}, "core_sections": []}
    write_atomic(run_dir / "results.json", results_json(results))

    sections: dict[str, list[Section]] = {}
    history: dict[str, History] = {}
    ctx.history = history
    error: str | None = None
    try:
        host.call("resinspect_configure", ctx=ctx)
        for role, m, label in [("model", net, model_label)] + ([("twin", twin_model, twin_label)] if twin_model else []):
            if s.epochs <= 0:
                continue
            ckpt = run_dir / ("model.pt" if role == "model" else "twin.pt")

            def save(module: nn.Module, metrics: dict[str, float], ckpt: Path = ckpt, label: str = label) -> None:
                save_checkpoint(ckpt, module, label, arch_kwargs, bundle.describe(), metrics)

            history[role] = train_model(m, train_loader, test_loader, s.train, dev, role=role, hooks=host, ctx=ctx,
                                        writer=writer, progress=progress, on_epoch_end=save)
        for _, m in ctx.networks():
            m.eval()
        sections = host.analyze(ctx)
    except TrainingDiverged as e:
        error = str(e)
        if e.history is not None:
            history[role] = e.history
    finally:
        host.call("resinspect_unconfigure", ctx=ctx, include_failed=True)
    if s.epochs <= 0 or not (run_dir / "model.pt").exists():
        save_checkpoint(run_dir / "model.pt", net, model_label, arch_kwargs, bundle.describe(), {})

    core = [_training_section(history)] if history else []
    _write_tensorboard(writer, core + [x for secs in sections.values() for x in secs])
    writer.close()
    results["training"] = {role: h.to_dict() for role, h in history.items()}
    for name in s.plugins:
        info = host.available[name]
        failure = host.failures.get(name)
        results["plugins"][name] = {
            "status": "failed" if failure else "ok", "version": info.version, "description": info.description,
            "seconds": round(host.timings.get(name, 0.0), 4), "error": failure.error if failure else None,
            "failed_hook": failure.hook if failure else None, "traceback": failure.traceback if failure else None}
    results["status"] = "failed" if error else ("plugins_failed" if host.failures else "complete")
    results["error"] = error
    results["run"].update(finished=dt.datetime.now().isoformat(timespec="seconds"),
                          seconds=round(time.perf_counter() - started, 3))
    save_results(run_dir, results, sections, core)
    from .report import render_html

    ordered = core + [x for name in s.plugins for x in sections.get(name, [])]
    write_atomic(run_dir / "index.html", render_html(results, ordered, config_toml))
    return RunResult(run_dir, results, sections, net, twin_model)


def _write_tensorboard(writer: Any, sections: list[Section]) -> None:
    """Each section's numeric metrics, figures and findings under ``<plugin>/``; the second and later
    sections of one plugin (e.g. the twin's summary) under ``<plugin>/section<n>/`` so tags never clash."""
    import io

    import numpy as np
    from PIL import Image

    seen: dict[str, int] = {}
    for s in sections:
        plugin = "train" if s.plugin == "core" else s.plugin
        n = seen[plugin] = seen.get(plugin, -1) + 1
        prefix = plugin if n == 0 else f"{plugin}/section{n}"
        for k, v in s.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                writer.add_scalar(f"{prefix}/{k}", v, 0)
        for i, f in enumerate(s.figures):
            img = np.asarray(Image.open(io.BytesIO(f.png)).convert("RGB"))
            writer.add_image(f"{prefix}/figure/{i}-{f.title}", img, 0, dataformats="HWC")
        if s.findings:
            writer.add_text(f"{prefix}/findings", "\n".join(f"- [{f.severity}] {f.text}" for f in s.findings), 0)
