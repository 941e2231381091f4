"""The plugin-author experience: docs, the example package, the scaffold, and meta-tests on the contract."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import resinspect
from resinspect import hookspecs
from resinspect.cli import main
from resinspect.testing import tiny_data

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("resinspect_"))


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert len(HOOKS) == 11
    for hook in HOOKS:
        assert f"### {hook}\n" in docs, f"{hook} has no entry in docs/plugins.md"
        assert getattr(hookspecs, hook).__doc__.strip(), f"{hook} has no docstring"


def test_every_hook_has_a_test():
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_authoring.py")
    sources += (ROOT / "tests" / "inline_plugins.py").read_text()
    for hook in HOOKS:
        assert hook in sources, f"no test mentions {hook}"


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_plugin_works(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in _code_blocks(readme) if "def resinspect_analyze" in b)
    assert len(block.strip().splitlines()) <= 25
    path = tmp_path / "firstlayer.py"
    path.write_text(block)
    result = resinspect.run(data=tiny_data(train=64, test=32), plugins=[str(path)], epochs=1, device="cpu",
                            out=tmp_path / "r", options=["firstlayer.p=1"])
    section = result.section("firstlayer")
    expected = result.model.stem[0].weight.norm(1).item()
    assert section.metrics["norm"] == pytest.approx(expected)


def test_docs_example_plugin_works(tmp_path):
    block = _code_blocks((ROOT / "docs" / "plugins.md").read_text())[0]
    path = tmp_path / "blockgain.py"
    path.write_text(block)
    result = resinspect.run(data=tiny_data(train=64, test=32), plugins=[str(path)], epochs=1, device="cpu",
                            out=tmp_path / "r")
    section = result.section("blockgain")
    assert len(section.tables[0].rows) == 9 and section.findings
    # a third-party plugin's per-block metric joins the run's per-block dossier
    dossier = next(s for s in result.results.core_sections if s.plugin == "dossier")
    assert dossier.tables[0].columns == ["block", "stage", "gain (blockgain)"]
    assert [r[2] for r in dossier.tables[0].rows] == [section.metrics[r[0]] for r in dossier.tables[0].rows]


def _pip_install_target(package: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True, text=True)


def _env_with(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_example_package_installs_and_reports(tmp_path):
    target = tmp_path / "site"
    _pip_install_target(ROOT / "examples" / "resinspect-blockgain", target)
    env = _env_with(target)
    listing = subprocess.run([sys.executable, "-m", "resinspect.cli", "plugins", "--json"], env=env,
                             capture_output=True, text=True, check=True)
    plugins = {p["name"]: p for p in json.loads(listing.stdout)}
    assert plugins["blockgain"]["version"] == "0.1.0"
    assert plugins["blockgain"]["source"] == "entry point (resinspect-blockgain)"
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "resinspect.cli", "run", "--plugins", "blockgain", "--data-arg",
                          "size=8", "--epochs", "1", "--device", "cpu", "-q", "--out", str(out)], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    html = (out / "index.html").read_text()
    assert 'data-plugin="blockgain"' in html and "Block gain" in html


def test_new_plugin_scaffold_installs_and_its_test_passes(tmp_path):
    result = CliRunner().invoke(main, ["new-plugin", "depthcheck", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    package = tmp_path / "resinspect-depthcheck"
    assert (package / "resinspect_depthcheck.py").is_file() and (package / "tests" / "test_depthcheck.py").is_file()
    target = tmp_path / "site"
    _pip_install_target(package, target)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                           env=_env_with(target), capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout
    again = CliRunner().invoke(main, ["new-plugin", "depthcheck", "--dir", str(tmp_path)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(main, ["new-plugin", "Bad-Name", "--dir", str(tmp_path)])
    assert bad.exit_code == 1 and "lower-case letters" in bad.output


def test_docs_probe_example_runs():
    """docs/plugins.md's probe example, executed as written (its asserts are the closed-form answers)."""
    block = next(b for b in _code_blocks((ROOT / "docs" / "plugins.md").read_text()) if "block_vjp" in b)
    exec(compile(block, "docs/plugins.md", "exec"), {})


def test_docs_packaging_snippet_is_the_installed_example():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    snippet = re.search(r"```toml\n(.*?)```", docs, flags=re.S).group(1)
    assert snippet == (ROOT / "examples" / "resinspect-blockgain" / "pyproject.toml").read_text()
    assert "[build-system]" in snippet and 'version = "0.1.0"' in snippet
