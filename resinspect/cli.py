"""The ``resinspect`` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

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
            raise click.ClickException(str(e)) from e
        except OSError as e:  # an environment problem (a file or folder we cannot use): one line, no traceback
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from e

    return wrapper


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
        click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config file: [run], [train], "
                     "[data] and one table per plugin. Command-line options override it."),
        click.option("--data-arg", multiple=True, metavar="KEY=VALUE",
                     help="Dataset argument, e.g. size=16 or limit_train=500 (repeatable)."),
        click.option("--overwrite", is_flag=True, help="Replace a run already in --out."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars (they are also off when stderr is not "
                     "a terminal)."),
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
    click.secho(f"\nrun {status}: {result.run_dir / 'index.html'}", fg="green" if status == "complete" else "red",
                bold=True)
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
    for command in _COMMANDS:
        group.add_command(command)
    return group


def _run_command(group: click.Group, rows: Any) -> None:
    from .settings import click_options

    @group.command("run")
    @click_options("run", rows)
    @_command_options
    @click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.NAME=VALUE",
                  help="Set a plugin option, e.g. -o ablation.samples=200 (repeatable).")
    @click.pass_context
    @_friendly
    def run_cmd(click_ctx: click.Context, options: tuple[str, ...], quiet: bool, overwrite: bool,
                **kw: Any) -> None:
        """Train (or load) a model, run the analysis plugins, write the report.

        With no arguments: resnet20 on digits, 8 epochs, the default plugins,
        report in reports/<run>/index.html. Exits non-zero if a plugin failed.
        """
        from .runner import run

        settings = _settings(kw, rows)
        result = run(settings=settings, options=list(options), progress=not quiet and sys.stderr.isatty(),
                     overwrite=overwrite)
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
        result = run(settings=settings, progress=not quiet and sys.stderr.isatty(), overwrite=overwrite)
        final = result.results.training.get("model", {}).get("epochs", [{}])[-1:] or [{}]
        if final[0]:
            click.echo(f"test accuracy {final[0]['test_accuracy']:.3f} after {final[0]['epoch']} epochs")
        click.echo(f"checkpoint: {result.run_dir / 'model.pt'}")
        if result.status == "failed":
            click.secho(f"training failed: {result.results.error}", fg="red", err=True)
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
    click.echo(f"{'package.module:function':<24} your own factory; called with in_channels, num_classes, image_size "
               "if it accepts them")


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
    """Re-render RUN_DIR/index.html from its results.json and figures (no recomputation)."""
    from .rundir import render_run

    click.echo(f"wrote {render_run(Path(run_dir))}")


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="RUN_DIR...")
@click.option("--out", default="compare.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML page to write.")
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
        click.secho(f"warning: a plugin named '{name}' is already installed ({taken.source}); the two will clash "
                    "in `--plugins`: consider another name", fg="yellow", err=True)
    root = new_plugin(name, parent)
    # a bare folder name is read by pip as a package to download: give it a path
    target = root if root.is_absolute() or str(root).startswith((".", os.sep)) else f".{os.sep}{root}"
    click.echo(f"created {root}: pip install {target} && resinspect run --plugins {name}")


_COMMANDS = [plugins_cmd, models_cmd, datasets_cmd, report_cmd, compare_cmd, new_plugin_cmd]
main = build_cli()

if __name__ == "__main__":  # pragma: no cover
    main()
