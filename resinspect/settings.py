"""Run settings: one declarative table from which everything else is derived.

Each :class:`Setting` row gives a name, type, default, help text and check. From :data:`SETTINGS` come:
the command-line options of ``resinspect run`` / ``train`` (:func:`click_options`), the keys of a config
file's ``[run]`` and ``[train]`` tables (:meth:`RunSettings.from_config`), the ``config.toml`` a run writes
(:meth:`RunSettings.to_toml_dict`) and the keyword arguments of :func:`resinspect.run`. Adding a setting is
adding a row.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ResinspectError, UnknownNameError
from .options import Interval, convert
from .plugins import DEFAULT_PLUGINS
from .rundir import read_config_file
from .training import TrainConfig

__all__ = ["Setting", "SETTINGS", "RunSettings", "DEFAULT_EPOCHS", "click_options"]

DEFAULT_EPOCHS = 8
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


# the analysis budget's default: every image of the small datasets (digits' 397 test images, shapes' 400,
# CIFAR-10's 10,000 is cut), so their results do not change; an ImageNet folder of 50,000 is cut to 1,024
DEFAULT_SAMPLES = 1024
# about a minute of one analysis on 2 CPU cores (~30e9 multiply-adds a second); resnet20's whole default
# ablation on digits costs a fifth of it, torchvision's resnet50 on 64 images of 224 px 0.26e12 per pass
DEFAULT_COMPUTE = 2e12


def _tab_kinds(kinds: Any) -> str | None:
    from .tensorboard import TAB_KINDS

    bad = [k for k in kinds or [] if k not in TAB_KINDS]
    return f"unknown kind(s) {', '.join(map(repr, bad))}; valid: {', '.join(TAB_KINDS)}" if bad else None


def _within(bounds: str) -> Callable[[Any], str | None]:
    """A check that refuses values outside ``bounds`` (an :class:`~resinspect.options.Interval`, e.g.
    ``"(0, 100]"``): every numeric setting has finite bounds, so NaN, infinities and absurd sizes are refused
    before any work starts."""
    interval = Interval.parse(bounds)

    def check(v: Any) -> str | None:
        return None if v is None else interval.problem(v)

    return check


@dataclass(frozen=True)
class Setting:
    """One run setting.

    Attributes:
        name: the Python name (``run()`` keyword and config key), e.g. ``batch_size``.
        type: ``str``, ``int``, ``float``, ``bool``, ``list`` (comma-separated on the command line) or
            ``Path`` (a string naming a file or folder).
        default: the value when nothing sets it (None: unset; ``epochs`` resolves it at run time).
        help: the ``--help`` text.
        table: the config-file table it lives in, ``"run"`` or ``"train"`` (train settings go to the loop).
        short: a one-letter command-line alias such as ``-m``.
        choices: the valid values, or None.
        check: returns a description of what is wrong with a value, or None.
        commands: the CLI commands that offer it.
    """

    name: str
    type: type
    default: Any
    help: str
    table: str = "run"
    short: str | None = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    commands: tuple[str, ...] = ("run", "train")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` as this setting's type, checked; ``where`` names the source in the error."""
        if value is None:
            return None
        try:
            value = convert(self.type, value)
        except (TypeError, ValueError):
            raise ResinspectError(
                f"{where}: {self.name} = {value!r} is not a valid "
                f"{'boolean' if self.type is bool else self.type.__name__}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ResinspectError(f"{where}: {self.name} = {value!r} is not one of {', '.join(map(str, self.choices))}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ResinspectError(f"{where}: {self.name} = {value!r}: {problem}")
        return value


SETTINGS: list[Setting] = [
    Setting("model", str, "resnet20", "Model name (see `resinspect models`) or package.module:function.", short="-m"),
    Setting("data", str, "digits", "Dataset name (see `resinspect datasets`).", short="-d"),
    Setting(
        "data_root", Path, "data", "Folder (or file) with local dataset files (MNIST, CIFAR-10, ImageFolder, text)."
    ),
    Setting("download", bool, False, "Let torchvision try to download missing dataset files."),
    Setting(
        "plugins",
        list,
        list(DEFAULT_PLUGINS),
        "Comma-separated plugins to run (names from `resinspect plugins`, module paths or .py files).",
        short="-p",
        commands=("run",),
    ),
    Setting(
        "epochs",
        int,
        None,
        f"Training epochs (default {DEFAULT_EPOCHS}; 0 with --checkpoint).",
        short="-e",
        check=_within("[0, 100_000]"),
    ),
    Setting("twin", bool, False, "Also train the plain twin (same layers, no shortcuts)."),
    Setting(
        "twin_kind",
        str,
        None,
        "The twin drops only the skips of this kind of residual site (a transformer's attention or MLP "
        "skips, Ji et al. 2025), named plain-<kind>:<model>; implies --twin.",
        choices=("attention", "mlp"),
    ),
    Setting(
        "checkpoint",
        Path,
        None,
        "Load the model from this checkpoint instead of training from scratch (with "
        "--twin, also the twin.pt saved beside it).",
    ),
    Setting(
        "weights",
        str,
        None,
        "Pretrained weights: a torchvision weights name for a torchvision:<builder> model (DEFAULT, "
        "IMAGENET1K_V2, …; read from the torch hub cache) or a state-dict file (.pth, .pt, .bin, .safetensors). "
        "The model keeps its classes; image folders get the weights' preprocessing.",
    ),
    Setting("out", Path, None, "Run directory (default: a new folder under the reports root).", short="-O"),
    Setting("reports_root", Path, "reports", "Where runs without --out get their folder."),
    Setting("device", str, "auto", "Where to compute.", choices=("auto", "cpu", "cuda")),
    Setting(
        "seed",
        int,
        0,
        "Random seed: with the same torch version and thread count, the same seed gives the same numbers on CPU.",
        check=_within("[0, 9_223_372_036_854_775_807]"),
    ),
    Setting(
        "samples",
        int,
        DEFAULT_SAMPLES,
        "Analysis budget: the most test (and training) images any one analysis uses; each analysis's own "
        "image option is capped by it, and the report says where it cut (0: no budget).",
        check=_within("[0, 100_000_000]"),
    ),
    Setting(
        "compute",
        float,
        DEFAULT_COMPUTE,
        "Compute budget of one analysis, in the model's multiply-adds: analyses whose cost grows faster than "
        "linearly (ablation's pairs and random subsets, attribution's images and sanity steps, landscape's "
        "grid, curvature's products, …) cut those parts to fit, and the report says what they cut (0: no "
        "budget). Before the analysis the run prints each plugin's estimated seconds.",
        check=_within("[0, 1e21]"),
    ),
    Setting(
        "tb_skip",
        list,
        [],
        "TensorBoard tabs not to write, comma-separated: hparams, graph, projector, pr (PR curves), layout "
        "(custom scalars), text.",
        check=_tab_kinds,
    ),
    Setting(
        "tb_samples",
        int,
        2048,
        "Test images (the first ones) behind TensorBoard's PR curves and projector.",
        check=_within("[1, 10_000_000]"),
    ),
    Setting(
        "tb_embeddings",
        int,
        256,
        "Test images whose head-input features go to TensorBoard's projector (0: none).",
        check=_within("[0, 100_000]"),
    ),
    Setting(
        "batch_size",
        int,
        _TRAIN_DEFAULTS["batch_size"],
        "Training batch size.",
        table="train",
        check=_within("[1, 65536]"),
    ),
    Setting("optimizer", str, _TRAIN_DEFAULTS["optimizer"], "Optimizer.", table="train", choices=("adam", "sgd")),
    Setting(
        "lr",
        float,
        _TRAIN_DEFAULTS["lr"],
        "Learning rate (default 1e-3 with Adam, 0.1 with SGD).",
        table="train",
        check=_within("(0, 100]"),
    ),
    Setting("momentum", float, _TRAIN_DEFAULTS["momentum"], "SGD momentum.", table="train", check=_within("[0, 1]")),
    Setting(
        "weight_decay",
        float,
        _TRAIN_DEFAULTS["weight_decay"],
        "Weight decay.",
        table="train",
        check=_within("[0, 100]"),
    ),
    Setting(
        "schedule",
        str,
        _TRAIN_DEFAULTS["schedule"],
        "Learning-rate schedule.",
        table="train",
        choices=("cosine", "step", "none"),
    ),
    Setting(
        "step_size",
        int,
        _TRAIN_DEFAULTS["step_size"],
        "Epochs between decays of the step schedule.",
        table="train",
        check=_within("[1, 100_000]"),
    ),
    Setting(
        "gamma",
        float,
        _TRAIN_DEFAULTS["gamma"],
        "Decay factor of the step schedule.",
        table="train",
        check=_within("(0, 100]"),
    ),
    Setting(
        "sync_bn",
        bool,
        _TRAIN_DEFAULTS["sync_bn"],
        "Under torchrun, normalise each BatchNorm over the whole "
        "global batch (SyncBatchNorm, CUDA only) instead of each process's share.",
        table="train",
    ),
]
_RESERVED_TABLES = {"run", "train", "data"}


def _table(rows: Sequence[Setting]) -> dict[str, Setting]:
    return {r.name: r for r in rows}


class RunSettings:
    """The values of every setting of :data:`SETTINGS` (attribute access: ``s.model``), plus the dataset's
    own arguments (``data_args``, the ``[data]`` table) and the plugin option tables of a config file."""

    def __init__(self, rows: Sequence[Setting] | None = None, data_args: dict[str, Any] | None = None, **values: Any):
        object.__setattr__(self, "rows", _table(rows if rows is not None else SETTINGS))
        object.__setattr__(self, "values", {n: copy.copy(r.default) for n, r in self.rows.items()})
        object.__setattr__(self, "data_args", dict(data_args or {}))
        object.__setattr__(self, "plugin_tables", {})
        object.__setattr__(self, "config_file", None)  # the --config file the values came from, if any
        self.update(values, "settings")

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("data_args", "plugin_tables", "config_file"):
            object.__setattr__(self, name, value)
        else:
            self.update({name: value}, "settings")

    def update(self, values: dict[str, Any], where: str) -> None:
        """Set values (None leaves a setting as it is); unknown names and bad values raise, naming ``where``."""
        unknown = sorted(set(values) - set(self.rows))
        if unknown:
            raise UnknownNameError("setting", unknown[0], self.rows, owner=f"({where})")
        for name, value in values.items():
            if value is not None:
                if isinstance(value, Path):
                    value = str(value)
                self.values[name] = self.rows[name].coerce(value, where)

    def train_config(self) -> TrainConfig:
        """What the training loop needs: the ``train`` settings plus epochs and seed."""
        train = {n: self.values[n] for n, r in self.rows.items() if r.table == "train"}
        return TrainConfig(**train, epochs=self.epochs if self.epochs is not None else DEFAULT_EPOCHS, seed=self.seed)

    @classmethod
    def from_config(cls, path: str | Path | None, rows: Sequence[Setting] | None = None) -> RunSettings:
        """Read a ``--config`` TOML file: ``[run]``, ``[train]``, ``[data]`` and one table per plugin."""
        s = cls(rows)
        if path is None:
            return s
        cfg = read_config_file(path)
        for table, value in cfg.items():
            if not isinstance(value, dict):
                raise ResinspectError(
                    f"config {path}: '{table}' should be a table ([{table}] with keys under it), "
                    f"not a {type(value).__name__}"
                )
        for table in ("run", "train"):
            given = cfg.get(table, {})
            valid = sorted(n for n, r in s.rows.items() if r.table == table)
            bad = sorted(set(given) - set(valid))
            if bad:
                raise ResinspectError(
                    f"config {path}: unknown key(s) in [{table}]: {', '.join(bad)}; valid: {', '.join(valid)}"
                )
            s.update(given, f"config {path} [{table}]")
        s.data_args = dict(cfg.get("data", {}))
        s.plugin_tables = {k: v for k, v in cfg.items() if k not in _RESERVED_TABLES}
        s.config_file = str(path)
        return s

    def to_dict(self) -> dict[str, Any]:
        """Flat run settings with ``train`` nested and ``data_args`` (what results.json's ``config`` holds)."""
        out = {n: v for n, v in self.values.items() if self.rows[n].table == "run"}
        out["train"] = {n: v for n, v in self.values.items() if self.rows[n].table == "train"}
        out["data_args"] = dict(self.data_args)
        return out

    def to_toml_dict(self, plugin_options: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``config.toml``: ``[run]`` (without ``out``, so a rerun gets a folder of its own), ``[train]``,
        ``[data]`` and the options of each plugin that has any."""
        run = {n: v for n, v in self.values.items() if self.rows[n].table == "run" and n not in ("out",)}
        train = {n: v for n, v in self.values.items() if self.rows[n].table == "train"}
        out: dict[str, Any] = {"run": run, "train": train, "data": dict(self.data_args)}
        for name in self.plugins or []:
            if plugin_options.get(name):
                out[name] = plugin_options[name]
        return out


def click_options(command: str, rows: Iterable[Setting] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per setting offered by ``command`` (all default to None, so
    only what the user typed overrides the config file)."""
    import click

    def decorate(fn: Callable) -> Callable:
        for row in reversed([r for r in (rows if rows is not None else SETTINGS) if command in r.commands]):
            names = [row.flag] + ([row.short] if row.short else [])
            shown = ",".join(row.default) if isinstance(row.default, list) else row.default
            default_text = "" if row.default in (None, [], False) else f" Default: {shown}."
            kwargs: dict[str, Any] = {"default": None, "help": row.help + default_text}
            if row.type is bool:
                names = [f"{row.flag}/--no-{row.flag[2:]}"] + ([row.short] if row.short else [])
            elif row.choices is not None:
                kwargs["type"] = click.Choice([str(c) for c in row.choices])
            elif row.type in (int, float):
                kwargs["type"] = row.type
            elif row.type is Path:
                kwargs["type"] = click.Path()
            fn = click.option(*names, row.name, **kwargs)(fn)
        return fn

    return decorate
