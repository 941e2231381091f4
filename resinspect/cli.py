"""The ``resinspect`` command line."""

from __future__ import annotations

import dataclasses
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


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--config", "config", type=click.Path(dir_okay=False), help="TOML config file: [run], [train], "
                     "[data] and one table per plugin. Command-line options override it."),
        click.option("--model", "-m", help="Model name (see `resinspect models`) or package.module:function. "
                     "Default: resnet20."),
        click.option("--data", "-d", help="Dataset name (see `resinspect datasets`). Default: digits."),
        click.option("--data-arg", multiple=True, metavar="KEY=VALUE",
                     help="Dataset argument, e.g. size=16 or limit_train=500 (repeatable)."),
        click.option("--data-root", help="Folder with local dataset files (MNIST, CIFAR-10, ImageFolder). "
                     "Default: ./data."),
        click.option("--download", is_flag=True, default=None, help="Let torchvision try to download missing "
                     "dataset files."),
        click.option("--epochs", "-e", type=click.IntRange(min=0), help="Training epochs (default 8; 0 with "
                     "--checkpoint)."),
        click.option("--twin/--no-twin", default=None, help="Also train the plain twin (same layers, no shortcuts)."),
        click.option("--checkpoint", type=click.Path(), help="Load the model from this checkpoint instead of "
                     "training from scratch (with --twin, also the twin.pt saved beside it)."),
        click.option("--out", "-O", type=click.Path(file_okay=False), help="Run directory (default: a new folder "
                     "under reports/)."),
        click.option("--overwrite", is_flag=True, help="Replace a run already in --out."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to compute (default auto)."),
        click.option("--seed", type=int, help="Random seed (default 0): the same seed gives the same numbers on CPU."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Training batch size (default 64)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate (default 1e-3 Adam, "
                     "0.1 SGD)."),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), help="Optimizer (default adam)."),
        click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), help="LR schedule (default "
                     "cosine)."),
        click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay (default 0)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _settings(kw: dict[str, Any]):
    from .runner import RunSettings, settings_from_config

    s = settings_from_config(kw.pop("config"), RunSettings())
    for key in ("model", "data", "data_root", "download", "epochs", "twin", "checkpoint", "out", "device", "seed"):
        if kw.get(key) is not None:
            setattr(s, key, kw[key])
    train = {k: kw[k] for k in ("batch_size", "lr", "optimizer", "schedule", "weight_decay") if kw.get(k) is not None}
    s.train = dataclasses.replace(s.train, **train)
    s.data_args = {**s.data_args, **_pairs(kw.get("data_arg", ()), "--data-arg")}
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resinspect")
def main() -> None:
    """resinspect: measure why a residual network works.

    Trains (or loads) a residual network, runs analysis plugins on it and writes
    TensorBoard logs, results.json and one self-contained HTML report.
    """


@main.command("run")
@_run_options
@click.option("--plugins", "-p", help="Comma-separated plugins to run (names from `resinspect plugins`, module "
              "paths or .py files). Default: summary,activations,gradflow,weights,ablation,attribution.")
@click.option("-o", "--option", "options", multiple=True, metavar="PLUGIN.NAME=VALUE",
              help="Set a plugin option, e.g. -o ablation.samples=200 (repeatable).")
@click.pass_context
@_friendly
def run_cmd(click_ctx: click.Context, plugins: str | None, options: tuple[str, ...], quiet: bool,
            overwrite: bool, **kw: Any) -> None:
    """Train (or load) a model, run the analysis plugins, write the report.

    With no arguments: resnet20 on digits, 8 epochs, the default plugins,
    report in reports/<run>/index.html. Exits non-zero if a plugin failed.
    """
    from .plugins import PluginHost
    from .runner import run

    settings = _settings(kw)
    host = PluginHost()
    if plugins is not None:
        settings.plugins = [p for p in plugins.split(",") if p.strip()]
    else:
        settings.plugins = [p for p in settings.plugins if p in host.available] if not kw.get("config") \
            else settings.plugins
    result = run(settings=settings, options=list(options), progress=not quiet and sys.stderr.isatty(),
                 overwrite=overwrite, host=host)
    _print_summary(result)
    click_ctx.exit(result.exit_code)


@main.command("train")
@_run_options
@click.pass_context
@_friendly
def train_cmd(click_ctx: click.Context, quiet: bool, overwrite: bool, **kw: Any) -> None:
    """Train a model (and its twin with --twin) without analysis plugins.

    Writes the run directory with model.pt (a checkpoint for --checkpoint),
    TensorBoard logs and a report of the training curves.
    """
    from .runner import run

    settings = _settings(kw)
    settings.plugins = []
    result = run(settings=settings, progress=not quiet and sys.stderr.isatty(), overwrite=overwrite)
    final = result.results["training"].get("model", {}).get("epochs", [{}])[-1:] or [{}]
    if final[0]:
        click.echo(f"test accuracy {final[0]['test_accuracy']:.3f} after {final[0]['epoch']} epochs")
    click.echo(f"checkpoint: {result.run_dir / 'model.pt'}")
    if result.status == "failed":
        click.secho(f"training failed: {result.results['error']}", fg="red", err=True)
    click_ctx.exit(result.exit_code)


@main.command("plugins")
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


@main.command("models")
def models_cmd() -> None:
    """List the model names `--model` accepts."""
    from .models import MODELS

    for spec in MODELS.values():
        click.echo(f"{spec.name:<24} {spec.description}")
    click.echo(f"{'package.module:function':<24} your own factory; called with in_channels, num_classes, image_size "
               "if it accepts them")


@main.command("datasets")
def datasets_cmd() -> None:
    """List the dataset names `--data` accepts."""
    from .data import DATASETS

    for name, (_, description) in DATASETS.items():
        click.echo(f"{name:<14} {description}")


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@_friendly
def report_cmd(run_dir: str) -> None:
    """Re-render RUN_DIR/index.html from its results.json and figures (no recomputation)."""
    from .rundir import render_run

    click.echo(f"wrote {render_run(Path(run_dir))}")


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "parent", default=".", type=click.Path(file_okay=False), help="Where to create the package.")
@_friendly
def new_plugin_cmd(name: str, parent: str) -> None:
    """Write a working plugin package NAME: module, pyproject with the entry point, a passing test."""
    from .scaffold import new_plugin

    root = new_plugin(name, parent)
    click.echo(f"created {root}: pip install {root} && resinspect run --plugins {name}")


if __name__ == "__main__":  # pragma: no cover
    main()
