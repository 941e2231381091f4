"""The plugin host: discovery through the ``resinspect`` entry-point group, selection, options, isolation.

Built-in analyses are ordinary entry-point plugins (see pyproject.toml). A
plugin can also be given as a module path (``mypkg.myplugin``) or a file
(``./myplugin.py``). Each plugin's hook implementations are called one plugin
at a time: one that raises is marked failed (its error and traceback kept for
the report), its remaining hooks are skipped, and the other plugins go on.
Set ``RESINSPECT_TRACE_PLUGINS=1`` to log every hook call to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import ResinspectError, UnknownNameError
from .memory import peak_cuda_mb, peak_rss_mb, reset_peak
from .options import OptionRegistry
from .section import Section

__all__ = ["PluginHost", "PluginInfo", "DEFAULT_PLUGINS", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "resinspect"
# The analyses `resinspect run` uses when --plugins is not given.
DEFAULT_PLUGINS = (
    "summary",
    "activations",
    "formulas",
    "gradflow",
    "weights",
    "ablation",
    "paths",
    "shattered",
    "similarity",
    "spectra",
    "attribution",
    "rank",
)
TRACE_ENV = "RESINSPECT_TRACE_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    plugin: Any
    source: str
    version: str = ""
    description: str = ""
    load_error: str | None = None

    def hooks(self) -> list[str]:
        return sorted(n for n in dir(self.plugin) if n.startswith("resinspect_")) if self.plugin else []


@dataclass
class PluginFailure:
    plugin: str
    hook: str
    error: str
    traceback: str


def _describe(obj: Any) -> str:
    """The docstring's first paragraph, on one line."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""


def discover_entry_points() -> dict[str, PluginInfo]:
    """Load every plugin of the ``resinspect`` entry-point group; one that fails to import is kept as broken."""
    found: dict[str, PluginInfo] = {}
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in found:
            continue
        dist = getattr(ep, "dist", None)
        version = dist.version if dist is not None else ""
        source = f"entry point ({dist.metadata['Name']})" if dist is not None else "entry point"
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party plugin must not break the host
            found[ep.name] = PluginInfo(ep.name, None, source, version, "", f"{type(e).__name__}: {e}")
            continue
        found[ep.name] = PluginInfo(ep.name, obj, source, version, _describe(obj))
    return found


def load_plugin_spec(spec: str) -> PluginInfo:
    """Load a plugin given as a file path (``./x.py``) or an importable module (``pkg.mod``)."""
    path = Path(spec)
    if spec.endswith(".py") or os.sep in spec:
        if not path.is_file():
            raise ResinspectError(f"plugin file {spec}: no such file")
        name = path.stem
        module_name = f"resinspect_local_plugin_{name}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ResinspectError(f"plugin file {spec}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ResinspectError(f"plugin file {spec}: failed to import: {type(e).__name__}: {e}") from e
        return PluginInfo(name, module, f"file {path}", "", _describe(module))
    module = importlib.import_module(spec)
    return PluginInfo(spec.rsplit(".", 1)[-1], module, f"module {spec}", "", _describe(module))


def _importable(name: str) -> bool:
    try:
        return name.isidentifier() and importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class PluginHost:
    """Discovers plugins, activates a selection and calls hooks with failure isolation."""

    def __init__(self, available: dict[str, PluginInfo] | None = None, trace: bool | None = None):
        self.available: dict[str, PluginInfo] = discover_entry_points() if available is None else dict(available)
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.active: list[str] = []
        self.failures: dict[str, PluginFailure] = {}
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, dict[str, float]] = {}  # per plugin's analysis: peak memory (resinspect.memory)
        self.estimated: dict[str, float | None] = {}  # per plugin: the run's estimate of its seconds
        self.fatal = False  # True under torchrun: a plugin error ends the run instead of being recorded
        self.trace = os.environ.get(TRACE_ENV, "") not in ("", "0") if trace is None else trace
        self._impls: dict[str, list[tuple[str, Any, tuple[str, ...]]]] = {}

    # -- selection -------------------------------------------------------------------------
    def add(self, info: PluginInfo) -> None:
        self.available[info.name] = info

    def resolve_names(self, names: Iterable[str]) -> list[str]:
        """Turn ``--plugins`` entries into plugin names, loading file/module specs; unknown names fail."""
        resolved = []
        for raw in names:
            name = raw.strip()
            if not name:
                continue
            looks_like_path = name.endswith(".py") or os.sep in name or "." in name
            if name not in self.available and (looks_like_path or _importable(name)):
                try:
                    info = load_plugin_spec(name)
                except ImportError:
                    raise UnknownNameError("plugin", name, self.available) from None
                if not info.hooks():
                    raise ResinspectError(f"plugin {name}: {info.source} defines no resinspect_* hooks")
                self.add(info)
                name = info.name
            if name not in self.available:
                raise UnknownNameError("plugin", name, self.available)
            if name not in resolved:
                resolved.append(name)
        return resolved

    def activate(self, names: Iterable[str]) -> list[str]:
        """Register the named plugins (in this order) with the pluggy manager."""
        for name in self.resolve_names(names):
            info = self.available[name]
            if info.load_error:
                self._fail(name, "import", info.load_error, info.load_error)
                self.active.append(name)
                continue
            try:
                self.pm.register(info.plugin, name=name)
            except pluggy.PluginValidationError as e:
                raise ResinspectError(f"plugin {name}: {e}") from e
            self.active.append(name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise ResinspectError(f"{e} (hook names are listed in resinspect/hookspecs.py)") from e
        self._impls.clear()
        return list(self.active)

    # -- options ---------------------------------------------------------------------------
    def option_registry(self) -> OptionRegistry:
        """Every available plugin's declared options (so config tables for any installed plugin validate)."""
        registry = OptionRegistry()
        for name, info in self.available.items():
            group = registry.group(name)
            fn = getattr(info.plugin, "resinspect_addoptions", None) if info.plugin else None
            if fn is None:
                continue
            try:
                fn(options=group)
            except Exception as e:  # noqa: BLE001 - a plugin with broken options is reported, not fatal
                info.load_error = f"resinspect_addoptions raised {type(e).__name__}: {e}"
                group.options.clear()
        return registry

    def register_extensions(self) -> None:
        """Let every available plugin add models and datasets (``resinspect_register_models`` /
        ``resinspect_register_datasets``); one that raises is reported as broken, not fatal."""
        if getattr(self, "_extensions_registered", False):
            return
        self._extensions_registered = True
        from .data import DatasetRegistry
        from .models import ModelRegistry

        for name, info in self.available.items():
            for hook, registry in (
                ("resinspect_register_models", ModelRegistry(name)),
                ("resinspect_register_datasets", DatasetRegistry(name)),
            ):
                fn = getattr(info.plugin, hook, None) if info.plugin else None
                if fn is None:
                    continue
                try:
                    fn(registry=registry)
                except Exception as e:  # noqa: BLE001 - a broken plugin is reported, not fatal
                    info.load_error = f"{hook} raised {type(e).__name__}: {e}"

    # -- calling ---------------------------------------------------------------------------
    def _hook_impls(self, hook: str) -> list[tuple[str, Any, tuple[str, ...]]]:
        if hook not in self._impls:
            caller = getattr(self.pm.hook, hook)
            by_plugin = {impl.plugin_name: impl for impl in caller.get_hookimpls()}
            names = [n for n in self.active if n in by_plugin]
            # the selection's order, except that tryfirst implementations go first and trylast ones last
            names.sort(key=lambda n: 0 if by_plugin[n].tryfirst else 2 if by_plugin[n].trylast else 1)
            self._impls[hook] = [(n, by_plugin[n].function, tuple(by_plugin[n].argnames)) for n in names]
        return self._impls[hook]

    def has(self, hook: str) -> bool:
        return any(name not in self.failures for name, _, _ in self._hook_impls(hook))

    def call(
        self, hook: str, *, include_failed: bool = False, only: str | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call ``hook`` on each active plugin (or on ``only``); returns ``[(plugin, result)]`` of those that
        succeeded."""
        results = []
        ctx = kwargs.get("ctx")
        for name, fn, argnames in self._hook_impls(hook):
            if (name in self.failures and not include_failed) or (only is not None and name != only):
                continue
            start = time.perf_counter()
            outer = getattr(ctx, "plugin", None)
            if ctx is not None:
                ctx.plugin = name  # so ctx.options() and ctx.log_scalar() know whose hook this is
            try:
                result = fn(**{a: kwargs[a] for a in argnames})
            except Exception as e:  # noqa: BLE001 - isolation is the point
                if self.fatal:  # under torchrun the other ranks may be waiting on this one: end the run
                    from .distributed import PEER_FAILED, is_peer_failure

                    rank = getattr(ctx, "rank", 0)
                    if is_peer_failure(e):
                        raise ResinspectError(f"{PEER_FAILED} while {name} waited for it in {hook}") from e
                    raise ResinspectError(
                        f"rank {rank}: plugin {name} failed in {hook}: {type(e).__name__}: {e}"
                    ) from e
                self._fail(name, hook, f"{type(e).__name__}: {e}", traceback.format_exc())
                continue
            finally:
                if ctx is not None:
                    ctx.plugin = outer
                elapsed = time.perf_counter() - start
                self.timings[name] = self.timings.get(name, 0.0) + elapsed
                if self.trace:
                    sys.stderr.write(f"[resinspect] {hook} -> {name} ({elapsed * 1000:.1f} ms)\n")
            results.append((name, result))
        return results

    def _fail(self, name: str, hook: str, error: str, tb: str) -> None:
        if name not in self.failures:
            self.failures[name] = PluginFailure(name, hook, error, tb)
            if self.trace:
                sys.stderr.write(f"[resinspect] plugin {name} failed in {hook}: {error}\n")

    def estimates(self, ctx: Any) -> dict[str, float | None]:
        """Every active plugin's ``resinspect_estimate`` (multiply-adds; None where it has none, returns
        something else, or fails: an estimate never fails a plugin)."""
        order = [name for name, _, _ in self._hook_impls("resinspect_analyze")]  # the order they will run in
        out: dict[str, float | None] = {name: None for name in order if name not in self.failures}
        for name, fn, argnames in self._hook_impls("resinspect_estimate"):
            if name not in out:
                continue
            outer = getattr(ctx, "plugin", None)
            ctx.plugin = name
            try:
                value = fn(**{a: ctx for a in argnames})  # (ctx is the hook's only argument)
                out[name] = float(value) if isinstance(value, (int, float)) and value >= 0 else None
            except Exception:  # noqa: BLE001 - only an estimate
                out[name] = None
            finally:
                ctx.plugin = outer
        return out

    def analyze(
        self,
        ctx: Any,
        progress: bool = False,
        say: Callable[[str], None] | None = None,
        done: Callable[[str, list[Section]], None] | None = None,
    ) -> dict[str, list[Section]]:
        """Run ``resinspect_analyze`` on every active plugin (saying which one runs when ``progress``, and
        when each starts and ends, with its seconds, through ``say``); failed plugins get an error section.
        ``done(name, sections)`` is called as each plugin finishes (so that the run can record it at once)."""
        sections: dict[str, list[Section]] = {name: [] for name in self.active}
        returned = []
        for name, _, _ in self._hook_impls("resinspect_analyze"):
            if name in self.failures:
                continue
            if say is not None:
                say(f"analyze {name}: start")
            elif progress:
                sys.stderr.write(f"[resinspect] analysing: {name}\n")
                sys.stderr.flush()
            start = time.perf_counter()
            reset_peak()
            got = self.call("resinspect_analyze", ctx=ctx, only=name)
            self.peaks[name] = {"rss_mb": round(peak_rss_mb(), 1)}
            gpu = peak_cuda_mb()
            if gpu is not None:
                self.peaks[name]["cuda_mb"] = round(gpu, 1)
            if say is not None:
                outcome = f"failed ({self.failures[name].error})" if name in self.failures else "ok"
                say(f"analyze {name}: {outcome} in {time.perf_counter() - start:.1f} s")
            returned += got
            finished: list[Section] = []
            for _, result in got:  # visible to the plugins that run later (ctx.section)
                finished = [r for r in (result if isinstance(result, list) else [result]) if isinstance(r, Section)]
                for r in finished:
                    r.plugin = name
                if hasattr(ctx, "sections"):
                    ctx.sections[name] = finished
            if done is not None:
                done(name, finished)
        for name, result in returned:
            items = [] if result is None else result if isinstance(result, list) else [result]
            bad = [type(s).__name__ for s in items if not isinstance(s, Section)]
            if bad:
                self._fail(
                    name, "resinspect_analyze", f"returned {bad[0]}, expected Section, a list of them or None", ""
                )
                continue
            for s in items:
                s.plugin = name
            sections[name] = items
        for name, failure in self.failures.items():
            sections[name] = [
                Section(
                    title=f"{name} (failed)",
                    plugin=name,
                    status="failed",
                    explanation=f"The plugin '{name}' raised an error in {failure.hook}; the other plugins were not "
                    "affected.",
                    error=failure.error,
                    traceback=failure.traceback,
                )
            ]
        return sections

    def describe(self) -> list[dict[str, Any]]:
        """Installed plugins: name, version, description, source, hooks and options."""
        registry = self.option_registry()
        return [
            {
                "name": n,
                "version": i.version,
                "description": i.description,
                "source": i.source,
                "hooks": i.hooks(),
                "load_error": i.load_error,
                "options": [o.describe() for o in registry.group(n).options.values()],
            }
            for n, i in sorted(self.available.items())
        ]
