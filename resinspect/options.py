"""Typed plugin options: declared by plugins, set from ``-o plugin.name=value`` and config files."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import OptionError, UnknownNameError

__all__ = ["Option", "OptionGroup", "OptionRegistry", "Interval", "convert"]

_TYPES = (int, float, str, bool, list)
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    """The values a number may take, written as in mathematics: ``"[1, 201]"`` (both ends included),
    ``"(0, 1]"`` (0 excluded), ``"(-1, 1)"``. Both ends are finite numbers: every numeric option and setting
    has an upper bound, so that an absurd size is refused before any work starts."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Interval:
        m = _INTERVAL.match(text)
        if m is None:
            raise ValueError(f"interval {text!r}: expected e.g. '[1, 100]' or '(0, 1]'")
        low, high = float(m.group(2)), float(m.group(3))
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"interval {text!r}: the ends must be finite numbers, the lower one first")
        return cls(low, high, m.group(1) == "(", m.group(4) == ")")

    def __contains__(self, v: object) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def __str__(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        )

    def problem(self, v: Any) -> str | None:
        """What is wrong with ``v`` (None when it is inside)."""
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        return None if v in self else f"must be in {self}"


def _number(x: float) -> str:
    return f"{int(x):,}".replace(",", "_") if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"


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
        return (
            list(value) if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        )
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        out = float(value)
        if not math.isfinite(out):  # "nan" and "inf" parse as floats, but no setting means them
            raise ValueError(value)
        return out
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
    bounds: Interval | None = None
    cost: Callable[[Any], str] | None = None

    @property
    def key(self) -> str:
        return f"{self.plugin}.{self.name}"

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (a CLI string or a TOML value) to the option's type, or raise OptionError."""
        try:
            out = convert(self.type, value)
        except (TypeError, ValueError):
            finite = " finite" if self.type is float else ""
            raise OptionError(f"option {self.key}: {value!r} is not a valid{finite} {self.type.__name__}") from None
        if self.bounds is not None and out not in self.bounds:
            cost = f" ({self.key}={out} would cost {self.cost(out)})" if self.cost is not None else ""
            raise OptionError(f"option {self.key}: {value!r} {self.bounds.problem(out)}{cost}")
        if self.choices is not None:
            bad = [v for v in (out if isinstance(out, list) else [out]) if v not in self.choices]
            if bad:
                raise OptionError(f"option {self.key}: {bad[0]!r} is not one of {', '.join(map(str, self.choices))}")
        if self.check is not None:
            problem = self.check(out)
            if problem:
                raise OptionError(f"option {self.key}: {value!r}: {problem}")
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "choices": list(self.choices) if self.choices else None,
            "bounds": str(self.bounds) if self.bounds is not None else None,
        }


class OptionGroup:
    """The options of one plugin; handed to ``resinspect_addoptions``."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.options: dict[str, Option] = {}

    def add(
        self,
        name: str,
        type: type,
        default: Any,
        help: str,
        *,
        choices: Iterable[Any] | None = None,
        check: Callable[[Any], str | None] | None = None,
        bounds: str | None = None,
        cost: Callable[[Any], str] | None = None,
    ) -> None:
        """Declare option ``name`` of ``type`` (int, float, str, bool or list) with a default and help text.

        ``bounds`` (int and float options): the values allowed, as an interval, ``"[1, 201]"`` or ``"(0, 1]"``;
        both ends are finite, so an absurd size is refused before any work starts. NaN and infinities are
        refused for every float option. ``cost(value)`` says in words what a value would cost (``"441 grid
        points"``); the error for a value above the bound quotes it. ``check(value)`` may return a problem
        description for any other invalid value (e.g. ``lambda v: "name one" if not v else None``).
        """
        if type not in _TYPES:
            raise TypeError(
                f"plugin {self.plugin}: option {name} has unsupported type {type!r}; use one of "
                f"{', '.join(t.__name__ for t in _TYPES)}"
            )
        if name in self.options:
            raise ValueError(f"plugin {self.plugin}: option {name} declared twice")
        if not help:
            raise ValueError(f"plugin {self.plugin}: option {name} needs help text")
        interval = None
        if bounds is not None:
            if type not in (int, float):
                raise TypeError(f"plugin {self.plugin}: option {name}: bounds are for int and float options")
            interval = Interval.parse(bounds)
            if default not in interval:
                raise ValueError(f"plugin {self.plugin}: option {name}: the default {default!r} is outside {interval}")
        self.options[name] = Option(
            self.plugin,
            name,
            type,
            default,
            help,
            tuple(choices) if choices is not None else None,
            check,
            interval,
            cost,
        )


class OptionRegistry:
    """All plugins' option groups; resolves values from the CLI and config files."""

    def __init__(self) -> None:
        self.groups: dict[str, OptionGroup] = {}

    def group(self, plugin: str) -> OptionGroup:
        return self.groups.setdefault(plugin, OptionGroup(plugin))

    def resolve(
        self,
        config_tables: dict[str, dict[str, Any]] | None = None,
        cli_pairs: Iterable[str] = (),
        where: str = "config",
    ) -> dict[str, dict[str, Any]]:
        """Defaults, overridden by config-file tables, overridden by ``plugin.name=value`` strings.

        Raises :class:`OptionError` / :class:`UnknownNameError` for unknown plugins,
        unknown options and bad values, before any work starts; ``where`` names the config file in the
        errors about its tables.
        """
        values = {p: {n: o.default for n, o in g.options.items()} for p, g in self.groups.items()}
        for plugin, table in (config_tables or {}).items():
            if not isinstance(table, dict):
                raise OptionError(f"{where}: [{plugin}] must be a table of options, got {table!r}")
            for name, value in table.items():
                try:
                    values[plugin][name] = self._option(plugin, name).coerce(value)
                except OptionError as e:
                    raise OptionError(f"{where} [{plugin}] {name}: {e}") from None
                except UnknownNameError as e:
                    raise UnknownNameError(e.kind, e.value, e.valid, owner=f"in {where}") from None
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
