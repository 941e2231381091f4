"""The built wheel, not only the editable install, carries the package, the built-in plugins and the templates."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_finds_its_plugins(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("resinspect-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("plugins/") for n in names)  # installed as resinspect_plugins, never `plugins`
    assert "resinspect/report/templates/report.html" in names and "resinspect_plugins/ablation.py" in names
    assert "resinspect/results-schema.json" in names and "resinspect_plugins/formulas.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    code = ("import resinspect, resinspect_plugins.ablation as a\n"
            "from resinspect.plugins import discover_entry_points\n"
            "from resinspect.report import render_html\n"
            "from resinspect.results import Results, RunInfo, schema\n"
            "found = discover_entry_points()\n"
            "print(resinspect.__file__); print(a.__file__)\n"
            "print(sorted(n for n, i in found.items() if i.plugin is not None and 'site' in i.plugin.__file__))\n"
            "r = Results(run=RunInfo('r', '.', 'now'), config={}, environment={}, model={}, data={})\n"
            "print(len(render_html(r, '')) + 0 * len(schema()['required']))\n")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert {"ablation", "activations", "attribution", "gradflow", "summary", "weights"} <= set(eval(out[2]))
    assert int(out[3]) > 1000
