"""One run as a short sequence of named stages:

    resolve inputs -> build networks -> (open the run directory) -> train -> analyze -> write outputs

``resinspect run`` and ``resinspect.run(...)`` both end up in :func:`run`. Everything is validated in
*resolve* before any work starts; results.json says ``running`` from the moment the run directory exists,
``interrupted`` (with the phase) after Ctrl-C, and its final status once the outputs are written.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import gc
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .anatomy import block_table
from .context import RunContext
from .data import DataBundle, load_data, make_loaders
from .dossier import dossier_section
from .errors import CheckpointError, OutputError, ResinspectError, TrainingDiverged
from .memory import overall_peak_rss_mb
from .models import build_model, load_checkpoint, save_checkpoint, twin_name
from .models.pretrained import fit_to_model, load_strict, pretrained_bundle, resolve_weights
from .models.registry import plain_twin_of, remove_skips
from .plugins import PluginHost
from .probes import eval_mode
from .results import PluginResult, Results, RunInfo
from .rundir import dump_toml, new_run_dir, output_error, write_atomic
from .section import Section, pyplot
from .settings import DEFAULT_EPOCHS, RunSettings
from .task import task_named
from .tensorboard import TensorBoardRuns
from .training import History, resolve_device, train_model

__all__ = ["run", "RunResult", "RunSettings"]

_PACKAGES = ("torch", "torchvision", "captum", "tensorboard", "torchinfo", "pluggy", "seaborn", "matplotlib", "numpy")


@dataclass
class RunResult:
    """What a run produced. ``exit_code`` is 0 only when the run and every plugin succeeded."""

    run_dir: Path
    results: Results
    sections: dict[str, list[Section]]
    model: nn.Module
    twin: nn.Module | None = None

    @property
    def status(self) -> str:
        return self.results.status

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "complete" else 1

    def section(self, plugin: str) -> Section:
        return self.sections[plugin][0]


@dataclass
class _Networks:
    """What *build* produced."""

    bundle: DataBundle
    net: nn.Module
    label: str
    twin: nn.Module | None
    twin_label: str | None
    train_loader: DataLoader
    test_loader: DataLoader
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    train_sharded: DataLoader | None = None  # under torchrun: this rank's share of the training set
    in_memory: bool = False  # the model was given as a module (its training, if any, is unknown)


def _environment(device: torch.device) -> dict[str, Any]:
    packages = {}
    for p in _PACKAGES:
        try:
            packages[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "packages": packages,
    }


def _bundle_from_loaders(loaders: Sequence[DataLoader], model: nn.Module | None) -> DataBundle:
    train, test = loaders
    x, y = next(iter(train))
    num_classes = int(max(int(y.max()) + 1, 2))
    if model is not None:
        with torch.no_grad(), eval_mode(model):
            num_classes = model(x[:2].to(next(model.parameters()).device)).shape[-1]
    language = not x.is_floating_point() and y.dim() == 2  # token ids in, next tokens out
    return DataBundle(
        name="custom",
        train=train.dataset,
        test=test.dataset,
        in_channels=x.shape[1],
        image_size=x.shape[-1],
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        info={"source": "DataLoader pair"},
        task="next-token" if language else "classification",
    )


# -- stage 1: resolve ---------------------------------------------------------------------------------
def _resolve_settings(
    model: Any, data: Any, plugins: Any, config: Any, settings: RunSettings | None, values: dict[str, Any]
) -> RunSettings:
    if settings is not None and config is not None:
        raise ResinspectError("give run() either config= or settings=, not both")
    s = settings if settings is not None else RunSettings.from_config(config)
    unknown = sorted(set(values) - set(s.rows))
    if unknown:
        raise TypeError(
            f"run() got unknown argument(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(s.rows))}"
        )
    s.update(
        {
            "model": model if isinstance(model, str) else None,
            "data": data if isinstance(data, str) else None,
            "plugins": [plugins] if isinstance(plugins, str) else plugins,
            **values,
        },
        "run()",
    )
    if s.epochs is None:  # a loaded model is analysed as it is unless epochs are asked for
        s.epochs = 0 if s.checkpoint or s.weights or _is_hf(s.model) else DEFAULT_EPOCHS
    if s.weights and s.checkpoint:
        raise ResinspectError("--weights and --checkpoint both load a model's weights: give one of them")
    s.train_config().validate()
    return s


def _plugin_tables(
    s: RunSettings, options: dict[str, dict[str, Any]] | Iterable[str] | None
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    tables = dict(s.plugin_tables)
    if isinstance(options, dict):
        for plugin, values in options.items():
            tables[plugin] = {**tables.get(plugin, {}), **values}
        return tables, []
    return tables, list(options or [])


def _is_hf(model: str | None) -> bool:
    """Whether the run's model is a Hugging Face model (``hf:<folder or hub id>``): loaded trained."""
    return isinstance(model, str) and model.startswith("hf:")


# -- stage 2: build -----------------------------------------------------------------------------------
def _build(s: RunSettings, model: Any, data: Any, twin: Any, dist: Any) -> _Networks:
    if isinstance(data, DataBundle):
        bundle = data
    elif data is not None and not isinstance(data, str):
        bundle = _bundle_from_loaders(list(data), model if isinstance(model, nn.Module) else None)
    else:
        data_args = dict(s.data_args)
        if _is_hf(s.model) and s.data == "text":  # a Hugging Face model reads text through its own tokenizer
            data_args.setdefault("tokenizer", s.model.partition(":")[2])
        bundle = load_data(s.data, root=s.data_root, download=s.download, **data_args)
    s.data = bundle.name
    if bundle.info.get("evaluation_only") and s.epochs > 0:
        raise ResinspectError(
            f"dataset {bundle.name} has evaluation images only (no train/ folder): analyse a trained model with "
            "--epochs 0 (--weights or --checkpoint), or add a train/ folder to train"
        )
    pre = None
    if s.weights and not isinstance(model, nn.Module):
        pre = resolve_weights(s.model, s.weights, s.download)
        probe = build_model(s.model, bundle.in_channels, bundle.num_classes, bundle.image_size)
        bundle = pretrained_bundle(bundle, pre, fit_to_model(pre, probe)[0])
        del probe
    arch = {"in_channels": bundle.in_channels, "num_classes": bundle.num_classes, "image_size": bundle.image_size}
    if pre is not None:
        torch.manual_seed(s.seed)
        net, label = build_model(s.model, **arch), s.model
        load_strict(net, pre.state_dict, pre.source)
    elif isinstance(model, nn.Module):
        net, label = model, type(model).__name__
        if s.twin and not isinstance(twin, nn.Module):
            raise ResinspectError("twin=True needs a named model; for an in-memory model pass twin=<plain module>")
    elif s.checkpoint:
        net, label = _load_checkpointed(s, bundle, arch)
    else:
        torch.manual_seed(s.seed)
        net, label = build_model(s.model, **arch), s.model
    s.model = label
    # a loaded network's twin is a copy of it without skips (an hf: model is not loaded from disk and traced
    # again; one resumed from --checkpoint takes its trained twin.pt instead)
    loaded = pre is not None or (_is_hf(s.model) and not s.checkpoint)
    twin_net, twin_label = _twin_for(s, model, twin, net, label, arch, loaded)
    if isinstance(data, (list, tuple)):
        if dist.enabled:
            raise ResinspectError(
                "under torchrun, give run() a dataset name or a DataBundle, not ready loaders "
                "(the training set is split across the ranks)"
            )
        train_loader, test_loader = data
    else:
        train_loader, test_loader = make_loaders(bundle, s.train_config().batch_size, s.seed)
    sharded = make_loaders(bundle, s.train_config().batch_size, s.seed, dist=dist)[0] if dist.enabled else None
    _check_fits(bundle, [(label, net), (twin_label or "", twin_net)], test_loader)
    return _Networks(
        bundle, net, label, twin_net, twin_label, train_loader, test_loader, arch, sharded, isinstance(model, nn.Module)
    )


def _check_fits(bundle: DataBundle, nets: list[tuple[str, nn.Module | None]], loader: DataLoader) -> None:
    """One line, before any training, when a network cannot read the data or its outputs cannot be scored
    under the data's task (an image classifier on token sequences, a language model on images)."""
    task = task_named(bundle.task)
    x, y = next(iter(loader))
    for label, net in nets:
        # only where a mismatch is possible: token data, or a network that embeds tokens (an image model on
        # images runs as before, without an extra forward pass)
        if net is None or not (task.is_language or any(isinstance(m, nn.Embedding) for m in net.modules())):
            continue
        device = next(iter(net.parameters()), torch.empty(0)).device
        try:
            with torch.no_grad(), eval_mode(net):
                out = net(x[:2].to(device))
        except Exception as e:  # noqa: BLE001 - any failure to read the data is the same user mistake
            first = (str(e).strip().splitlines() or [""])[0]
            kind = "token sequences (next-token task)" if task.is_language else f"{tuple(x.shape[1:])} inputs"
            hint = (
                "a next-token dataset needs a language model (gpt-tiny, attn-only-2)"
                if task.is_language
                else "language models (gpt-tiny, attn-only-2) need next-token data (--data induction or text)"
            )
            raise ResinspectError(
                f"model {label} cannot read dataset {bundle.name}'s {kind}: {type(e).__name__}: {first[:160]}; " + hint
            ) from None
        if not isinstance(out, torch.Tensor):
            raise ResinspectError(f"model {label} returned {type(out).__name__}, not a tensor of logits")
        try:
            task.check(out, y[:2].to(out.device))
        except ResinspectError as e:
            raise ResinspectError(f"model {label} on dataset {bundle.name}: {e}") from None


def _twin_for(
    s: RunSettings, model: Any, twin: Any, net: nn.Module, label: str, arch: dict[str, Any], pretrained: bool
) -> tuple[nn.Module | None, str | None]:
    """The run's twin: the one given, the model without the skips of one kind (``--twin-kind``), the
    pretrained network without its skips, or the registered / built plain twin."""
    if isinstance(twin, nn.Module):
        return twin, type(twin).__name__
    if s.twin_kind:
        s.twin = True
        if pretrained or isinstance(model, nn.Module) or s.checkpoint:
            twin_net = copy.deepcopy(net)
        else:
            torch.manual_seed(s.seed)
            twin_net = build_model(label, **arch)
        try:
            return remove_skips(twin_net, s.twin_kind), f"plain-{s.twin_kind}:{label}"
        except ValueError as e:
            raise ResinspectError(f"--twin-kind {s.twin_kind}: {e}") from None
    if s.twin and pretrained:
        # the pretrained network itself with every skip removed: the same weights, no shortcuts
        return remove_skips(copy.deepcopy(net)), f"plain:{label}"
    if s.twin:
        return _build_twin(s, label, arch)
    return None, None


def _load_checkpointed(s: RunSettings, bundle: DataBundle, arch: dict[str, Any]) -> tuple[nn.Module, str]:
    net, payload = load_checkpoint(s.checkpoint, allow_factory=s.model if ":" in s.model else None)
    saved = payload["arch_kwargs"]
    trained_on = (payload.get("dataset") or {}).get("name")
    for key in ("in_channels", "num_classes"):
        if key in saved and saved[key] != arch[key]:
            raise CheckpointError(
                f"checkpoint {s.checkpoint}: the model was built for {saved.get('in_channels')} input channel(s) "
                f"and {saved.get('num_classes')} classes"
                f"{' (dataset ' + str(trained_on) + ')' if trained_on else ''}; "
                f"dataset '{bundle.name}' has {bundle.in_channels} channel(s) and {bundle.num_classes} classes"
            )
    return net, payload["arch"]


def _build_twin(s: RunSettings, label: str, arch: dict[str, Any]) -> tuple[nn.Module, str]:
    """The registered plain twin (resnet20 → plain20), else the same architecture with every skip removed."""
    registered = twin_name(label)
    torch.manual_seed(s.seed)
    if registered is not None:
        twin_net, twin_label = build_model(registered, **arch), registered
    else:
        twin_net, twin_label = plain_twin_of(label, **arch), f"plain:{label}"
    if s.checkpoint and s.epochs <= 0:
        # an untrained twin would make every comparison meaningless: use the one saved with the model
        twin_ckpt = Path(s.checkpoint).with_name("twin.pt")
        if not twin_ckpt.exists():
            raise ResinspectError(
                f"--twin with --checkpoint {s.checkpoint}: no trained twin at {twin_ckpt} "
                "(it is saved by runs with --twin); train it with --epochs N instead"
            )
        twin_net, _ = load_checkpoint(twin_ckpt, model=twin_net)
    return twin_net, twin_label


# -- the run ------------------------------------------------------------------------------------------
def run(
    model: str | nn.Module | None = None,
    data: str | DataBundle | Sequence[DataLoader] | None = None,
    plugins: Iterable[str] | None = None,
    *,
    twin: bool | nn.Module = False,
    options: dict[str, dict[str, Any]] | Iterable[str] | None = None,
    config: str | Path | None = None,
    settings: RunSettings | None = None,
    progress: bool = False,
    narrate: bool = False,
    overwrite: bool = False,
    host: PluginHost | None = None,
    data_args: dict[str, Any] | None = None,
    **values: Any,
) -> RunResult:
    """Train (or load) a model, run analysis plugins on it, and write a run directory.

    Args:
        model: a model name (``"resnet20"``, ``"torchvision:resnet18"``, ``"pkg.mod:fn"``) or an
            ``nn.Module`` that exists only in memory.
        data: a dataset name, a :class:`DataBundle`, or a ``(train_loader, test_loader)`` pair.
        plugins: plugin names (or module paths / ``.py`` files); default: the default set.
        twin: also train the plain twin (``True``), or a given twin module.
        options: ``{"ablation": {"samples": 100}}`` or ``["ablation.samples=100"]``.
        config: a TOML config file (values given here override it); or ``settings``, ready-made.
        data_args: the dataset's own arguments (``{"size": 8}``; the ``[data]`` table, ``--data-arg``).
        progress: progress bars on stderr.
        narrate: one flushed line on stderr as each phase, epoch and plugin starts and ends, with its seconds
            (what the CLI does when stderr is not a terminal: logs of CI jobs, nohup, cluster jobs).
        values: any run setting of :data:`resinspect.settings.SETTINGS` by name: ``epochs``, ``out``,
            ``device``, ``seed``, ``checkpoint``, ``batch_size``, ``lr``, …

    Returns a :class:`RunResult`; ``result.exit_code`` is non-zero if anything failed.
    """
    s = _resolve_settings(
        model,
        data,
        plugins,
        config,
        settings,
        {**values, "twin": True if twin is True or isinstance(twin, nn.Module) else None},
    )
    if data_args:
        s.data_args = {**s.data_args, **data_args}
    clock = time.perf_counter()
    tables, pairs = _plugin_tables(s, options)
    host = host or PluginHost()
    host.register_extensions()
    s.plugins = host.activate(s.plugins)
    plugin_options = host.option_registry().resolve(
        tables, pairs, where=f"config {s.config_file}" if s.config_file else "config"
    )
    dist, owned = _distributed(s)
    dev = _process_setup(dist, host, resolve_device(s.device))
    progress, narrate = progress and dist.is_main, narrate and dist.is_main
    nets = _build(s, model, data, twin, dist)
    run_dir = _run_dir(s, nets, overwrite, dist)
    config_toml = dump_toml(s.to_toml_dict(plugin_options))
    if dist.is_main:
        write_atomic(run_dir / "config.toml", config_toml)
    ctx = _context(s, nets, dev, run_dir, plugin_options, host, progress, dist)
    results = _initial_results(s, nets, ctx, plugin_options)
    if dist.is_main:
        results.write(run_dir, figures=False)
    phase = ["train"]
    say = Narrator(narrate)
    heap = _FrozenHeap()
    stop = _TerminatedRaises() if dist.enabled else None
    try:
        return _stages(s, nets, ctx, host, results, config_toml, clock, progress, say, phase)
    except KeyboardInterrupt:
        if dist.is_main:
            _stopped(results, run_dir, "interrupted", phase[0], "interrupted by the user (Ctrl-C)")
        raise
    except Exception as e:  # e.g. an output that cannot be written: results.json must not say "running"
        if dist.is_main:
            _stopped(
                results,
                run_dir,
                "failed",
                phase[0],
                str(e) if isinstance(e, ResinspectError) else f"{type(e).__name__}: {e}",
            )
        raise
    finally:
        host.call("resinspect_unconfigure", ctx=ctx, include_failed=True)
        ctx.tensorboard.close()
        heap.close()
        if stop is not None:
            stop.close()
        if owned:
            from .distributed import shutdown

            shutdown()


def _stages(
    s: RunSettings,
    nets: _Networks,
    ctx: RunContext,
    host: PluginHost,
    results: Results,
    config_toml: str,
    clock: float,
    progress: bool,
    say: Narrator,
    phase: list[str],
) -> RunResult:
    """Train, analyse, write; ``phase[0]`` says which stage is running (for results.json if one stops)."""
    say(
        f"run {ctx.run_dir}: {nets.label}"
        + (f" and its twin {nets.twin_label}" if nets.twin is not None else "")
        + f" on {nets.bundle.name}, {s.epochs} epoch(s), plugins {', '.join(s.plugins) or '(none)'}"
    )
    with say.phase("train"):
        history, error = _train(s, nets, ctx, host, progress, say)
    phase[0] = "analyze"
    if ctx.is_main and history:  # the training curves are kept even if the analysis is stopped
        results.training = {role: h.to_dict() for role, h in history.items()}
        results.run.phase = "analyze"
        results.write(ctx.run_dir, figures=False)
    _estimate(ctx, host, results, say, progress)
    with say.phase("analyze"):
        sections = host.analyze(
            ctx, progress=progress, say=say if say.on else None, done=_keep_as_it_goes(ctx, host, results)
        )
    phase[0] = "write"
    _all_ranks_finished(ctx)
    with say.phase("write"):
        result = _write(s, nets, ctx, host, results, history, sections, error, config_toml, clock)
    say(f"run {result.status} in {time.perf_counter() - clock:.1f} s: {ctx.run_dir / 'index.html'}")
    return result


def _estimate(ctx: RunContext, host: PluginHost, results: Results, say: Narrator, progress: bool) -> None:
    """Before the analysis phase: the estimate of each plugin's seconds (:mod:`resinspect.estimate`), printed
    (unless quiet) and kept for results.json."""
    from .estimate import estimate

    try:
        est = estimate(ctx, host)
    except Exception as e:  # noqa: BLE001 - a model the probe cannot run still gets its analysis
        say(f"estimate: not made ({type(e).__name__}: {e})")
        return
    host.estimated = dict(est.plugins)
    if ctx.is_main:
        results.environment["estimate"] = est.to_dict()
        if say.on or progress:
            sys.stderr.write(f"[resinspect] {est.line()}\n")
            sys.stderr.flush()


def _process_setup(dist: Any, host: PluginHost, dev: torch.device) -> torch.device:
    """Under torchrun: a plugin error ends the run (other ranks may wait for this one), only rank 0 renders
    figures, and each process takes its own GPU. Returns this process's device."""
    if not dist.enabled:
        return dev
    host.fatal = True
    from . import section as _section

    _section.RENDER_FIGURES[0] = dist.is_main  # the other ranks' sections are never written
    return torch.device("cuda", dist.local_rank) if dev.type == "cuda" else dev


def _all_ranks_finished(ctx: RunContext) -> None:
    """Under torchrun, wait until every rank has finished its analyses before rank 0 calls the run complete: a
    rank that failed (and left) makes this raise here, so its failure reaches rank 0's results.json instead of
    a report that says "complete"."""
    if not ctx.dist.enabled:
        return
    from .distributed import PEER_FAILED

    try:
        ctx.dist.all_gather(ctx.rank)
    except Exception as e:  # noqa: BLE001 - any collective error here means a rank is gone
        raise ResinspectError(f"{PEER_FAILED} before the results were written (its error is printed above)") from e


def _distributed(s: RunSettings):
    """The process group when torchrun started this process (``(dist, True)`` when this run initialised it);
    ``(SINGLE, False)`` otherwise: a single-process run never touches torch.distributed."""

    from .distributed import SINGLE, from_environment

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return SINGLE, False
    import torch.distributed as tdist

    already = tdist.is_available() and tdist.is_initialized()
    return from_environment(s.device), not already


def _run_dir(s: RunSettings, nets: _Networks, overwrite: bool, dist: Any) -> Path:
    """The run directory: made by rank 0 and told to the others (which never write into it)."""
    made: tuple[str | None, str | None] = (None, None)
    if dist.is_main:
        try:
            made = (
                str(new_run_dir(s.out, s.reports_root, f"{nets.label}-{nets.bundle.name}", overwrite=overwrite)),
                None,
            )
        except ResinspectError as e:
            if not dist.enabled:
                raise
            made = (None, str(e))
    if dist.enabled:
        made = dist.all_gather(made)[0]
    if made[1] is not None:
        raise ResinspectError(made[1])
    path = made[0]
    assert path is not None  # (made on rank 0, or its error raised above)
    pointer = os.environ.get("RESINSPECT_RUN_DIR_FILE")  # set by `resinspect run --nproc`
    if pointer and dist.is_main:
        Path(pointer).write_text(path, encoding="utf-8")
    return Path(path)


class Narrator:
    """One flushed line on stderr per event (``[resinspect] ...``), or nothing when off: what a log shows of a
    run whose stderr is not a terminal, where progress bars are off."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            sys.stderr.write(f"[resinspect] {text}\n")
            sys.stderr.flush()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self(f"{name}: start")
        try:
            yield
        except BaseException:
            self(f"{name}: stopped after {time.perf_counter() - start:.1f} s")
            raise
        self(f"{name}: done in {time.perf_counter() - start:.1f} s")


class _TerminatedRaises:
    """Under torchrun, the agent ends the other ranks with SIGTERM when one fails: turn it into an error, so
    that rank 0 records in results.json that the run failed instead of leaving it "running"."""

    def __init__(self) -> None:
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        from .distributed import PEER_FAILED

        raise ResinspectError(f"{PEER_FAILED} (its error is printed above)")

    def close(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class _FrozenHeap:
    """While a run trains and analyses, the objects that exist before it (torch's, the data's, the models')
    are moved out of the garbage collector's view (:func:`gc.freeze`): each full collection would otherwise
    walk them all (some 400 000 objects, a quarter of a second on a small machine, several times a run).
    ``close`` gives them back, so nothing stays uncollectable after the run."""

    def __init__(self) -> None:
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        gc.unfreeze()


def _context(
    s: RunSettings,
    nets: _Networks,
    dev: torch.device,
    run_dir: Path,
    plugin_options: dict[str, Any],
    host: PluginHost,
    progress: bool,
    dist: Any,
) -> RunContext:
    nets.net.to(dev)
    if nets.twin is not None:
        nets.twin.to(dev)
    active = {n: plugin_options.get(n, {}) for n in s.plugins}
    ctx = RunContext(
        model=nets.net,
        model_name=nets.label,
        data=nets.bundle,
        train_loader=nets.train_loader,
        test_loader=nets.test_loader,
        device=dev,
        run_dir=run_dir,
        tensorboard=TensorBoardRuns(run_dir / "tb" if dist.is_main else None),
        twin=nets.twin,
        twin_name=nets.twin_label,
        seed=s.seed,
        config=s.to_dict(),
        plugin_options=active,
        show_progress=progress,
        dist=dist,
        trained=True
        if s.epochs > 0 or s.checkpoint or s.weights or _is_hf(s.model)
        else (None if nets.in_memory else False),
        samples=s.samples,
        compute=s.compute,
    )
    ctx.record_initial_state()
    return ctx


def _initial_results(s: RunSettings, nets: _Networks, ctx: RunContext, plugin_options: dict[str, Any]) -> Results:
    twin = (
        None
        if nets.twin is None
        else {
            "name": nets.twin_label,
            "parameters": sum(p.numel() for p in nets.twin.parameters()),
            "residual_blocks": len(ctx.blocks("twin")),
        }
    )
    return Results(
        run=RunInfo(
            name=ctx.run_dir.name,
            dir=str(ctx.run_dir),
            started=dt.datetime.now().isoformat(timespec="seconds"),
            phase="train",
        ),
        config={**ctx.config, "plugin_options": plugin_options},
        environment={**_environment(ctx.device), "world_size": ctx.world_size, "backend": ctx.dist.backend},
        model={
            "name": nets.label,
            "parameters": sum(p.numel() for p in nets.net.parameters()),
            "residual_blocks": block_table(ctx.blocks("model")),
            "checkpoint": s.checkpoint,
            "trained": ctx.trained,
            "twin": twin,
        },
        data=nets.bundle.describe(),
        resinspect_version=__version__,
    )


def _stopped(results: Results, run_dir: Path, status: str, phase: str, error: str) -> None:
    """Record in results.json that the run stopped early (best effort: the disk may be what failed)."""
    results.status, results.error, results.run.phase = status, error, phase
    results.run.finished = dt.datetime.now().isoformat(timespec="seconds")
    try:
        results.write(run_dir, figures=False)
    except OutputError:
        pass


# -- stage 3: train -----------------------------------------------------------------------------------
def _train(
    s: RunSettings, nets: _Networks, ctx: RunContext, host: PluginHost, progress: bool, say: Narrator | None = None
) -> tuple[dict[str, History], str | None]:
    say = say or Narrator(False)
    history: dict[str, History] = {}
    ctx.history = history
    host.call("resinspect_configure", ctx=ctx)
    if s.epochs > 0:
        for role, m in ctx.networks():
            ckpt = ctx.run_dir / ("model.pt" if role == "model" else "twin.pt")
            label = ctx.label(role)

            def save(module: nn.Module, metrics: dict[str, float], ckpt: Path = ckpt, label: str = label) -> None:
                _save_checkpoint(ckpt, module, label, nets, metrics)
                say(
                    f"train {label}: epoch {metrics.get('epoch', '?')}/{s.epochs}, test {ctx.task.score} "
                    f"{metrics.get('test_accuracy', float('nan')):.4f}"
                    + (f", perplexity {metrics['test_perplexity']:.2f}" if "test_perplexity" in metrics else "")
                    + f", {metrics.get('seconds', 0.0):.1f} s"
                )

            main = ctx.is_main  # training-time plugins see the averaged gradients and record on rank 0 only
            try:
                history[role] = train_model(
                    m,
                    nets.train_sharded or nets.train_loader,
                    nets.test_loader,
                    s.train_config(),
                    ctx.device,
                    role=role,
                    hooks=host if main else None,
                    ctx=ctx,
                    writer=ctx.tensorboard.writer(role) if main else None,
                    progress=progress,
                    on_epoch_end=save if main else None,
                    dist=ctx.dist,
                )
            except TrainingDiverged as e:
                if e.history is not None:
                    history[role] = e.history
                return history, str(e)
    for _, m in ctx.networks():
        m.eval()
    return history, None


def _save_checkpoint(path: Path, module: nn.Module, label: str, nets: _Networks, metrics: dict[str, float]) -> None:
    try:
        save_checkpoint(path, module, label, nets.arch_kwargs, nets.bundle.describe(), metrics)
    except OSError as e:
        raise output_error(path, "write the checkpoint", e) from e


# -- stage 5: write -----------------------------------------------------------------------------------
def _write(
    s: RunSettings,
    nets: _Networks,
    ctx: RunContext,
    host: PluginHost,
    results: Results,
    history: dict[str, History],
    sections: dict[str, list[Section]],
    error: str | None,
    config_toml: str,
    clock: float,
) -> RunResult:
    run_dir = ctx.run_dir
    results.status = "failed" if error else ("plugins_failed" if host.failures else "complete")
    if not ctx.is_main:  # only rank 0 writes; the others end here
        return RunResult(run_dir, results, sections, nets.net, nets.twin)
    if s.epochs <= 0 or not (run_dir / "model.pt").exists():
        _save_checkpoint(run_dir / "model.pt", nets.net, nets.label, nets, {})
    results.core_sections = [_training_section(ctx, history)] if history else []
    plugin_sections = [x for secs in sections.values() for x in secs]
    dossier = dossier_section(results.model.get("residual_blocks", []), plugin_sections)
    if dossier is not None:
        results.core_sections.append(dossier)
    results.training = {role: h.to_dict() for role, h in history.items()}
    results.plugins = {name: _plugin_result(host, name, sections.get(name, [])) for name in s.plugins}
    ctx.tensorboard.sections(results.core_sections + plugin_sections)
    results.tensorboard = _tensorboard_tabs(s, ctx, results, results.core_sections + plugin_sections, config_toml)
    ctx.tensorboard.close()
    results.error = error
    results.run.phase = None if not error else "train"
    results.run.finished = dt.datetime.now().isoformat(timespec="seconds")
    results.run.seconds = round(time.perf_counter() - clock, 3)
    results.run.peak_rss_mb = round(overall_peak_rss_mb(), 1)
    results.write(run_dir)
    from .report import render_html

    write_atomic(run_dir / "index.html", render_html(results, config_toml))
    return RunResult(run_dir, results, sections, nets.net, nets.twin)


def _tensorboard_tabs(
    s: RunSettings, ctx: RunContext, results: Results, sections: list[Section], config_toml: str
) -> dict[str, Any]:
    """HParams, graph, projector, PR curves, custom-scalars layout and texts (:mod:`resinspect.tbtabs`),
    with the networks in eval mode and the time each took."""
    from .tbtabs import write_tabs

    for _, m in ctx.networks():
        m.eval()
    settings = {
        "tb_skip": s.tb_skip,
        "tb_samples": s.tb_samples,
        "tb_embeddings": s.tb_embeddings,
        "lr": s.train_config().initial_lr,
    }
    return write_tabs(ctx.tensorboard, ctx, results, sections, {**settings, "config_toml": config_toml})


def _plugin_result(host: PluginHost, name: str, sections: list[Section]) -> PluginResult:
    info, failure = host.available[name], host.failures.get(name)
    skipped = bool(sections) and all(s.status == "skipped" for s in sections)
    return PluginResult(
        status="failed" if failure else "skipped" if skipped else "ok",
        version=info.version,
        description=info.description,
        seconds=host.timings.get(name, 0.0),
        error=failure.error if failure else None,
        failed_hook=failure.hook if failure else None,
        traceback=failure.traceback if failure else None,
        sections=sections,
        peak=dict(host.peaks.get(name, {})),
        estimate_seconds=host.estimated.get(name),
    )


def _keep_as_it_goes(ctx: RunContext, host: PluginHost, results: Results) -> Any:
    """What records each plugin in results.json as soon as it finishes (rank 0; still ``running``, without
    its figures, which are written at the end): a run stopped later keeps every finished section."""

    def done(name: str, sections: list[Section]) -> None:
        _say_subsampled(ctx, name, sections)
        if ctx.is_main:
            results.plugins[name] = _plugin_result(host, name, sections)
            results.run.phase = "analyze"
            results.write(ctx.run_dir, figures=False)

    return done


def _say_subsampled(ctx: RunContext, name: str, sections: list[Section]) -> None:
    """Under the plugin's first section, what the run's ``--samples`` budget cut (``ctx.subsampled``)."""
    cut = ctx.subsampled.get(name)
    if not cut or not sections:
        return
    parts = [
        f"{given:,} of the {asked:,} {which} {ctx.task.sample}s it asked for ({available:,} in the set)"
        for which, (given, asked, available) in cut.items()
    ]
    sections[0].finding(f"Subsampled by --samples {ctx.samples}: {'; '.join(parts)}.", "info")
    sections[0].metric("samples_budget", ctx.samples, tensorboard=False)


def _training_section(ctx: RunContext, history: dict[str, History]) -> Section:
    plt = pyplot()

    s = Section(
        title="Training",
        plugin="core",
        docs="explainer-degradation",
        explanation=f"Loss per step and test {ctx.task.score} per epoch of the model"
        + (
            " and its plain twin (same layers without shortcuts, same data order and seed)."
            if "twin" in history
            else "."
        ),
    )
    rows = []
    for role, h in history.items():
        for e in h.epochs:
            rows.append(
                [
                    ctx.label(role),
                    e["epoch"],
                    e["train_loss"],
                    e["train_accuracy"],
                    e["test_loss"],
                    e["test_accuracy"],
                    e["lr"],
                ]
            )
        if h.epochs:
            s.metrics[f"{role}/test_accuracy"] = h.epochs[-1]["test_accuracy"]
            s.metrics[f"{role}/train_loss"] = h.epochs[-1]["train_loss"]
    if rows:
        s.table(
            "Per-epoch metrics", ["network", "epoch", "train loss", "train acc", "test loss", "test acc", "lr"], rows
        )
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
        for role, h in history.items():
            a.plot(h.step_losses, label=ctx.label(role), lw=1)
            b.plot(
                [e["epoch"] for e in h.epochs],
                [e["test_accuracy"] for e in h.epochs],
                marker="o",
                label=ctx.label(role),
            )
        a.set(xlabel="step", ylabel="training loss", yscale="log", title="Loss per step")
        b.set(xlabel="epoch", ylabel=f"test {ctx.task.score}", title=f"Test {ctx.task.score}", ylim=(0, 1.02))
        a.legend(), b.legend()
        s.figure(fig, "Training curves", "Left: training loss per step (log scale). Right: test accuracy per epoch.")
    if "twin" in history and history["twin"].epochs and history["model"].epochs:
        gap = history["model"].epochs[-1]["test_accuracy"] - history["twin"].epochs[-1]["test_accuracy"]
        s.finding(
            f"After {len(history['model'].epochs)} epochs the residual network reaches "
            f"{history['model'].epochs[-1]['test_accuracy']:.1%} test {ctx.task.score} and its plain twin "
            f"{history['twin'].epochs[-1]['test_accuracy']:.1%} ({gap * 100:+.1f} points for the shortcuts)."
            + _perplexities(history),
            "good" if gap > 0.02 else "info",
        )
    return s


def _perplexities(history: dict[str, History]) -> str:
    """The training finding's sentence on test perplexity, for a language model (empty for classification)."""
    last = {role: h.epochs[-1].get("test_perplexity") for role, h in history.items() if h.epochs}
    if None in last.values() or len(last) < 2:
        return ""
    return f" Test perplexity {last['model']:.2f} vs {last['twin']:.2f}."
