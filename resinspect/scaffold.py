"""``resinspect new-plugin NAME``: write a working plugin package (module, pyproject, a passing test)."""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from .errors import ResinspectError

__all__ = ["new_plugin"]

_MODULE = '''"""{title}: describe in one line what this plugin measures."""

import torch

from resinspect import Section, hookimpl, residual_blocks

# The plugin's name is its entry point's name in pyproject.toml ("{name}"), its description this module's
# docstring, its version the package's: nothing to declare here.


@hookimpl
def resinspect_addoptions(options):
    options.add("samples", int, 64, "test images to use", bounds="[1, 100_000]")


@hookimpl
def resinspect_analyze(ctx):
    opts = ctx.options()  # this plugin's options (ctx knows whose hook is running)
    section = Section("{title}", explanation="What this measures and how to read it.")
    correct = count = 0
    with torch.no_grad():
        for x, y in ctx.test_batches(opts["samples"]):
            correct += (ctx.model(x).argmax(1) == y).sum().item()
            count += len(y)
    section.metrics["accuracy"] = correct / count
    section.metrics["residual_blocks"] = len(residual_blocks(ctx.model))
    section.finding(f"Accuracy on {{count}} test images: {{correct / count:.1%}}.")
    return section
'''

_PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "resinspect-{dist}"
version = "0.1.0"
description = "A resinspect plugin"
requires-python = ">=3.10"
dependencies = ["resinspect"]

[project.entry-points.resinspect]
{name} = "resinspect_{name}"

[tool.setuptools]
py-modules = ["resinspect_{name}"]
"""

_TEST = """from resinspect.testing import run_plugin


def test_{name}_runs_end_to_end():
    section = run_plugin("{name}", model="resnet20", epochs=1)
    assert 0.0 <= section.metrics["accuracy"] <= 1.0
    assert section.metrics["residual_blocks"] == 9
"""


def new_plugin(name: str, parent: str | Path = ".") -> Path:
    """Create ``parent/resinspect-<name>/`` and return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ResinspectError(
            f"plugin name '{name}': use lower-case letters, digits and underscores, "
            "starting with a letter (it becomes the module resinspect_<name>)"
        )
    root = Path(parent) / f"resinspect-{name.replace('_', '-')}"
    if root.exists():
        raise ResinspectError(f"{root}: already exists; choose another name or folder")
    (root / "tests").mkdir(parents=True)
    title = name.replace("_", " ").capitalize()
    (root / f"resinspect_{name}.py").write_text(_MODULE.format(name=name, title=title))
    (root / "pyproject.toml").write_text(_PYPROJECT.format(name=name, dist=name.replace("_", "-")))
    (root / "tests" / f"test_{name}.py").write_text(_TEST.format(name=name))
    (root / "README.md").write_text(
        f"# resinspect-{name}\n\nA resinspect plugin. `pip install .`, then "
        f"`resinspect run --plugins {name}`. Tests: `pytest tests`.\n"
    )
    return root
