"""Typed plugin options: declared by plugins, set from ``-o plugin.name=value`` and config files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .errors import OptionError, UnknownNameError

__all__ = ["Option", "OptionGroup", "OptionRegistry", "convert"]

_TYPES = (int, float, str, bool, list)


def convert(kind: type, value: Any) -> Any:
    """``value`` (a command-line string or a TOML value) as ``kind`` (bool, list, int, float, or anything
    else as a string); raises ``ValueError`` when it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind is list:
        return list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",")
                                                                     if v.strip()]
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        return float(value)
    return str(value)


@dataclass
class Option:
    plugin: str
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    @property
    def key(self) -> str:
        return f"{self.plugin}.{self.name}"

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (a CLI string or a TOML value) to the option's type, or raise OptionError."""
        try:
            out = convert(self.type, value)
        except (TypeError, ValueError):
            raise OptionError(f"option {self.key}: {value!r} is not a valid {self.type.__name__}") from None
        if self.choices is not None:
            bad = [v for v in (out if isinstance(out, list) else [out]) if v not in self.choices]
            if bad:
                raise OptionError(f"option {self.key}: {bad[0]!r} is not one of "
                                  f"{', '.join(map(str, self.choices))}")
        if self.check is not None:
            problem = self.check(out)
            if problem:
                raise OptionError(f"option {self.key}: {value!r}: {problem}")
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "help": self.help,
                "choices": list(self.choices) if self.choices else None}


class OptionGroup:
    """The options of one plugin; handed to ``resinspect_addoptions``."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.options: dict[str, Option] = {}

    def add(self, name: str, type: type, default: Any, help: str, *, choices: Iterable[Any] | None = None,
            check: Callable[[Any], str | None] | None = None) -> None:
        """Declare option ``name`` of ``type`` (int, float, str, bool or list) with a default and help text.

        ``check(value)`` may return a problem description for an invalid value
        (e.g. ``lambda v: "must be positive" if v <= 0 else None``).
        """
        if type not in _TYPES:
            raise TypeError(f"plugin {self.plugin}: option {name} has unsupported type {type!r}; use one of "
                            f"{', '.join(t.__name__ for t in _TYPES)}")
        if name in self.options:
            raise ValueError(f"plugin {self.plugin}: option {name} declared twice")
        if not help:
            raise ValueError(f"plugin {self.plugin}: option {name} needs help text")
        self.options[name] = Option(self.plugin, name, type, default, help,
                                    tuple(choices) if choices is not None else None, check)


class OptionRegistry:
    """All plugins' option groups; resolves values from the CLI and config files."""

    def __init__(self) -> None:
        self.groups: dict[str, OptionGroup] = {}

    def group(self, plugin: str) -> OptionGroup:
        return self.groups.setdefault(plugin, OptionGroup(plugin))

    def resolve(self, config_tables: dict[str, dict[str, Any]] | None = None,
                cli_pairs: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
        """Defaults, overridden by config-file tables, overridden by ``plugin.name=value`` strings.

        Raises :class:`OptionError` / :class:`UnknownNameError` for unknown plugins,
        unknown options and bad values, before any work starts.
        """
        values = {p: {n: o.default for n, o in g.options.items()} for p, g in self.groups.items()}
        for plugin, table in (config_tables or {}).items():
            if not isinstance(table, dict):
                raise OptionError(f"config: [{plugin}] must be a table of options, got {table!r}")
            for name, value in table.items():
                values[plugin][name] = self._option(plugin, name).coerce(value)
        for pair in cli_pairs:
            key, sep, value = pair.partition("=")
            plugin, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise OptionError(f"option '{pair}': expected PLUGIN.NAME=VALUE, e.g. ablation.samples=200")
            values[plugin][name] = self._option(plugin, name).coerce(value.strip())
        return values

    def _option(self, plugin: str, name: str) -> Option:
        if plugin not in self.groups:
            raise UnknownNameError("plugin", plugin, self.groups)
        group = self.groups[plugin]
        if name not in group.options:
            raise UnknownNameError("option", name, group.options, owner=f"of plugin {plugin}")
        return group.options[name]
