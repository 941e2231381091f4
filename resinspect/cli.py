"""The ``resinspect`` command line."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ResinspectError

_SEV_COLOURS = {"critical": "red", "warning": "yellow", "good": "green", "info": "blue"}


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into clean CLI errors (no traceback, exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ResinspectError, ValueError, TypeError) as e:
            _record_for_torchrun(str(e))
            raise click.ClickException(str(e)) from e
        except OSError as e:  # an environment problem (a file or folder we cannot use): one line, no traceback
            where = f"{e.filename}: " if e.filename else ""
            _record_for_torchrun(f"{where}{e.strerror or e}")
            raise click.ClickException(f"{where}{e.strerror or e}") from e

    return wrapper


def _record_for_torchrun(message: str) -> None:
    """Under torchrun, leave this rank's error where the elastic agent reads it (``--nproc`` prints it)."""
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not os.path.exists(path):
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            return
        if os.environ.get(RUN_DIR_FILE_ENV):  # started by `run --nproc`, which prints one line for all ranks
            raise SystemExit(1)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0") or 0)


def _typed_args(click_ctx: click.Context, leave_out: tuple[str, ...]) -> list[str]:
    """The command line of ``click_ctx``'s command as typed (options given on the command line only)."""
    from click.core import ParameterSource

    out = [click_ctx.info_name or ""]
    for param in click_ctx.command.params:
        if not isinstance(param, click.Option) or param.name in leave_out:
            continue
        if click_ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = click_ctx.params[param.name]
        if param.is_flag:
            if value:
                out.append(param.opts[0])
            elif param.secondary_opts:
                out.append(param.secondary_opts[0])
            continue
        for v in value if param.multiple else [value]:
            out += [param.opts[0], str(v)]
    return out


def _launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m resinspect ARGS`` as ``nproc`` processes under torchrun's elastic agent on this machine;
    a failed rank is reported in one line. Returns the exit status."""
    import logging
    import os
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report failures ourselves
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    with tempfile.TemporaryDirectory(prefix="resinspect-launch-") as tmp:
        os.environ[RUN_DIR_FILE_ENV] = str(Path(tmp) / "run_dir")  # rank 0 says where its run directory is
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "resinspect", *args)
        except ChildFailedError as e:
            from .distributed import PEER_FAILED

            own = {r: f for r, f in e.failures.items() if not str(f.message).startswith(PEER_FAILED)}
            first = min((own or e.failures).items(), key=lambda kv: (kv[1].timestamp, kv[0]))
            cause = f"rank {first[0]} failed: {first[1].message}"
            click.secho(cause, fg="red", err=True)
            for rank, failure in sorted(e.failures.items()):
                if rank != first[0]:
                    click.secho(f"  (then rank {rank}: {failure.message})", fg="red", err=True)
            _mark_failed(Path(tmp) / "run_dir", cause)
            return 1
        finally:
            os.environ.pop(RUN_DIR_FILE_ENV, None)
    return 0


RUN_DIR_FILE_ENV = "RESINSPECT_RUN_DIR_FILE"


def _mark_failed(pointer: Path, cause: str) -> None:
    """Record the failing rank's error in rank 0's results.json, whatever rank 0 wrote there (a rank's failure
    can come after rank 0 finished), and re-render a report that rank 0 wrote, so that it says "failed"."""
    from .rundir import render_run, write_atomic

    try:
        run_dir = Path(pointer.read_text(encoding="utf-8").strip())
        path = run_dir / "results.json"
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(d, dict):
        return
    d["status"], d["error"] = "failed", cause
    write_atomic(path, json.dumps(d, indent=2))
    if (run_dir / "index.html").is_file():
        try:
            render_run(run_dir)
        except ResinspectError:
            (run_dir / "index.html").unlink(missing_ok=True)  # never a report that looks complete


def _pairs(values: tuple[str, ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{v}': expected KEY=VALUE", param_hint=what)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _command_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of run/train that are not run settings: the config file, dataset arguments, overwrite, quiet."""
    opts = [
        click.option(
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            help="TOML config file: [run], [train], [data] and one table per plugin. Command-line options override it.",
        ),
        click.option(
            "--data-arg",
            multiple=True,
            metavar="KEY=VALUE",
            help="Dataset argument, e.g. size=16 or limit_train=500 (repeatable).",
        ),
        click.option("--overwrite", is_flag=True, help="Replace a run already in --out."),
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            help="No progress bars (they are also off when stderr is not "
            "a terminal; then each phase, epoch and plugin prints one line with its seconds instead).",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _settings(kw: dict[str, Any], rows: Any):
    """The run settings: the config file's, overridden by what was typed (every table row is a keyword)."""
    from .settings import RunSettings

    s = RunSettings.from_config(kw.pop("config"), rows)
    typed = {name: kw.pop(name) for name in list(kw) if name in s.rows}
    s.update(typed, "command line")
    s.data_args = {**s.data_args, **_pairs(kw.pop("data_arg", ()), "--data-arg")}
    return s


def _cli_value(value: Any) -> str:
    """A default as it would be typed after -o: true/false, comma-separated lists."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _print_summary(result: Any) -> None:
    click.echo("")
    for name, secs in result.sections.items():
        for sec in secs:
            if sec.status == "failed":
                click.secho(f"  [failed] {name}: {sec.error}", fg="red", err=True)
            for f in sec.findings:
                click.echo(f"  [{click.style(f.severity, fg=_SEV_COLOURS[f.severity])}] {name}: {f.text}")
    status = result.status
    click.secho(
        f"\nrun {status}: {result.run_dir / 'index.html'}", fg="green" if status == "complete" else "red", bold=True
    )
    click.echo(f"TensorBoard: tensorboard --logdir {result.run_dir / 'tb'}")


def build_cli(rows: Any = None) -> click.Group:
    """The ``resinspect`` command group, with run/train options derived from the settings table ``rows``
    (default :data:`resinspect.settings.SETTINGS`)."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="resinspect")
    def group() -> None:
        """resinspect: measure why a residual network works.

        Trains (or loads) a residual network, runs analysis plugins on it and writes
        TensorBoard logs, results.json and one self-contained HTML report.
        """

    _run_command(group, rows)
    _train_command(group, rows)
    _sweep_command(group, rows)
    for command in _COMMANDS:
        group.add_command(command)
    return group


def _plugin_option_flag(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-o/--option PLUGIN.NAME=VALUE`` (repeatable), as ``run`` and ``sweep`` take it."""
    return click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.NAME=VALUE", help=help)


def _run_command(group: click.Group, rows: Any) -> None:
    from .settings import click_options

    @group.command("run")
    @click_options("run", rows)
    @_command_options
    @_plugin_option_flag("Set a plugin option, e.g. -o ablation.samples=200 (repeatable).")
    @click.option(
        "--nproc",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Run across N processes on this machine (torchrun's launcher: gloo on CPU, one GPU per "
        "process with NCCL); the same results as one process. Or start `torchrun "
        "--nproc-per-node N -m resinspect run ...` yourself.",
    )
    @click.pass_context
    @_friendly
    def run_cmd(
        click_ctx: click.Context, options: tuple[str, ...], quiet: bool, overwrite: bool, nproc: int | None, **kw: Any
    ) -> None:
        """Train (or load) a model, run the analysis plugins, write the report.

        With no arguments: resnet20 on digits, 8 epochs, the default plugins,
        report in reports/<run>/index.html. Exits non-zero if a plugin failed.
        """
        import os

        if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
            _settings(dict(kw), rows)  # a bad setting is reported once, here, not by every rank
            click_ctx.exit(_launch(nproc, _typed_args(click_ctx, ("nproc",))))
        from .runner import run

        settings = _settings(kw, rows)
        tty = sys.stderr.isatty()
        result = run(
            settings=settings,
            options=list(options),
            progress=not quiet and tty,
            narrate=not quiet and not tty,
            overwrite=overwrite,
        )
        if _rank() == 0:
            _print_summary(result)
        click_ctx.exit(result.exit_code)


def _train_command(group: click.Group, rows: Any) -> None:
    from .settings import click_options

    @group.command("train")
    @click_options("train", rows)
    @_command_options
    @click.pass_context
    @_friendly
    def train_cmd(click_ctx: click.Context, quiet: bool, overwrite: bool, **kw: Any) -> None:
        """Train a model (and its twin with --twin) without analysis plugins.

        Writes the run directory with model.pt (a checkpoint for --checkpoint),
        TensorBoard logs and a report of the training curves.
        """
        from .runner import run

        settings = _settings(kw, rows)
        settings.plugins = []
        tty = sys.stderr.isatty()
        result = run(settings=settings, progress=not quiet and tty, narrate=not quiet and not tty, overwrite=overwrite)
        final = result.results.training.get("model", {}).get("epochs", [{}])[-1:] or [{}]
        if final[0]:
            click.echo(f"test accuracy {final[0]['test_accuracy']:.3f} after {final[0]['epoch']} epochs")
        click.echo(f"checkpoint: {result.run_dir / 'model.pt'}")
        if result.status == "failed":
            click.secho(f"training failed: {result.results.error}", fg="red", err=True)
        click_ctx.exit(result.exit_code)


def _sweep_command(group: click.Group, rows: Any) -> None:
    from .settings import SETTINGS, click_options

    table = rows if rows is not None else SETTINGS
    shared = [r for r in table if r.name not in ("model", "seed", "out", "checkpoint")]

    @group.command("sweep")
    @click.option(
        "--models",
        required=True,
        metavar="NAME,NAME,...",
        help="Comma-separated models, e.g. resnet20,resnet32,resnet56 (or plain20,resnet20,...).",
    )
    @click.option("--seeds", default="0", show_default=True, metavar="N,N,...", help="Comma-separated seeds.")
    @click_options("run", shared)
    @_command_options
    @_plugin_option_flag("Set a plugin option for every run (repeatable).")
    @click.option(
        "--out",
        "-O",
        "sweep_out",
        type=click.Path(file_okay=False),
        help="The sweep folder (default: <reports-root>/sweep-<models>). Rerunning into it resumes.",
    )
    @click.option(
        "--jobs",
        "-j",
        default=1,
        show_default=True,
        type=click.IntRange(min=1),
        help="Runs at once, in separate processes; the CPU threads are divided among them.",
    )
    @click.pass_context
    @_friendly
    def sweep_cmd(
        click_ctx: click.Context,
        models: str,
        seeds: str,
        options: tuple[str, ...],
        quiet: bool,
        overwrite: bool,
        sweep_out: str | None,
        jobs: int,
        **kw: Any,
    ) -> None:
        """Train and analyse every (model, seed) combination into one sweep folder.

        Each combination is an ordinary run directory (every run option applies to
        each); the folder also gets sweep.json and index.html: test error against
        depth for residual and plain networks (mean ± std over seeds, He et al. 2016
        Fig. 6 / Table 6), training curves per depth, each plugin's key metrics
        against depth, and whether the plain family degrades. Rerunning the same
        command skips the complete runs and redoes the rest.
        """
        from .sweep import sweep

        settings = _settings(kw, rows)
        result = sweep(
            [m for m in models.split(",")],
            [x for x in seeds.split(",") if x.strip()],
            out=sweep_out,
            jobs=jobs,
            settings=settings,
            options=list(options),
            overwrite=overwrite,
            progress=not quiet and sys.stderr.isatty() and jobs == 1,
            echo=click.echo,
        )
        click.echo("")
        for f in result.aggregate.get("findings", []):
            click.echo(f"  [{click.style(f['severity'], fg=_SEV_COLOURS[f['severity']])}] {f['text']}")
        bad = [r for r in result.runs if r.status != "complete"]
        for r in bad:
            click.secho(f"  {r.model} seed {r.seed}: {r.status}{': ' + r.error if r.error else ''}", fg="red", err=True)
        click.secho(
            f"\nsweep {'complete' if not bad else 'finished with problems'}: {result.sweep_dir / 'index.html'}",
            fg="green" if not bad else "red",
            bold=True,
        )
        click.echo(f"TensorBoard (HParams tab: every network of every run): tensorboard --logdir {result.sweep_dir}")
        click_ctx.exit(result.exit_code)


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_friendly
def plugins_cmd(as_json: bool) -> None:
    """List installed plugins with version, description and options."""
    from .plugins import DEFAULT_PLUGINS, PluginHost

    described = PluginHost().describe()
    if as_json:
        click.echo(json.dumps(described, indent=2, default=str))
        return
    for p in described:
        default = " (default)" if p["name"] in DEFAULT_PLUGINS else ""
        click.secho(f"{p['name']} {p['version']}{default}", bold=True)
        click.echo(f"  {p['description'] or '(no description)'}")
        click.echo(f"  from {p['source']}")
        if p["load_error"]:
            click.secho(f"  BROKEN: {p['load_error']}", fg="red")
        for o in p["options"]:
            which = "one or more of" if o["type"] == "list" else "one of"
            choices = f"; {which} {', '.join(map(str, o['choices']))}" if o["choices"] else ""
            choices += f" in {o['bounds']}" if o.get("bounds") else ""
            setting = f"-o {p['name']}.{o['name']}={_cli_value(o['default'])}"
            click.echo(f"    {setting}\n        ({o['type']}{choices}) {o['help']}")


@click.command("models")
def models_cmd() -> None:
    """List the model names `--model` accepts (built in, and added by installed plugins)."""
    from .models import MODELS
    from .plugins import PluginHost

    PluginHost().register_extensions()
    for spec in MODELS.values():
        source = "" if spec.source == "resinspect" else f" [{spec.source}]"
        click.echo(f"{spec.name:<24} {spec.description}{source}")
    click.echo(f"{'timm:<name>':<24} {_timm_line()}")
    click.echo(
        f"{'hf:<folder or hub id>':<24} a Hugging Face causal language model, from a save_pretrained folder or the "
        "local cache (offline; needs the optional transformers package: pip install resinspect[hf])"
    )
    click.echo(
        f"{'package.module:function':<24} your own factory; called with in_channels, num_classes, image_size "
        "if it accepts them"
    )


def _timm_line() -> str:
    """The ``resinspect models`` line for timm: how many models it has, or how to install it."""
    try:
        import timm
    except ImportError:
        return "any of timm's models (needs the optional timm package: pip install resinspect[timm])"
    return (
        f"any of timm {timm.__version__}'s {len(timm.list_models())} models (timm.list_models()); --weights FILE "
        "for their weights"
    )


@click.command("datasets")
def datasets_cmd() -> None:
    """List the dataset names `--data` accepts (built in, and added by installed plugins)."""
    from .data import DATASETS, dataset_source
    from .plugins import PluginHost

    PluginHost().register_extensions()
    for name, (_, description) in DATASETS.items():
        source = dataset_source(name)
        click.echo(f"{name:<14} {description}{'' if source == 'resinspect' else f' [{source}]'}")


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False), metavar="RUN_DIR")
@_friendly
def report_cmd(run_dir: str) -> None:
    """Re-render RUN_DIR/index.html from its results.json and figures (no recomputation); for a sweep folder,
    the sweep report from its sweep.json and runs."""
    from .rundir import render_run, write_atomic
    from .sweep import SWEEP_FILE, read_sweep, render_sweep

    path = Path(run_dir)
    if (path / SWEEP_FILE).is_file():
        write_atomic(path / "index.html", render_sweep(read_sweep(path), path))
        click.echo(f"wrote {path / 'index.html'}")
        return
    click.echo(f"wrote {render_run(path)}")


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="RUN_DIR...")
@click.option(
    "--out", default="compare.html", show_default=True, type=click.Path(dir_okay=False), help="The HTML page to write."
)
@_friendly
def compare_cmd(run_dirs: tuple[str, ...], out: str) -> None:
    """Put two or more runs (RUN_DIR...) side by side from their results.json files (no model needed): settings
    that differ, accuracy, every metric with the differences highlighted, findings that differ, training curves,
    figures."""
    from .compare import compare, render_compare_html
    from .rundir import write_atomic

    cmp = compare(run_dirs)
    write_atomic(Path(out), render_compare_html(cmp))
    click.echo(f"{len(cmp.differences)} of {len(cmp.metrics)} metrics differ; wrote {out}")


@click.command("new-plugin")
@click.argument("name")
@click.option("--dir", "parent", default=".", type=click.Path(file_okay=False), help="Where to create the package.")
@_friendly
def new_plugin_cmd(name: str, parent: str) -> None:
    """Write a working plugin package NAME: module, pyproject with the entry point, a passing test."""
    import os

    from .plugins import PluginHost
    from .scaffold import new_plugin

    taken = PluginHost().available.get(name)
    if taken is not None:
        click.secho(
            f"warning: a plugin named '{name}' is already installed ({taken.source}); the two will clash "
            "in `--plugins`: consider another name",
            fg="yellow",
            err=True,
        )
    root = new_plugin(name, parent)
    # a bare folder name is read by pip as a package to download: give it a path
    target = root if root.is_absolute() or str(root).startswith((".", os.sep)) else f".{os.sep}{root}"
    click.echo(f"created {root}: pip install {target} && resinspect run --plugins {name}")


_COMMANDS = [plugins_cmd, models_cmd, datasets_cmd, report_cmd, compare_cmd, new_plugin_cmd]
main = build_cli()

if __name__ == "__main__":  # pragma: no cover
    main()
