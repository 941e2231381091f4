"""resinspect compare: runs side by side from their results.json files alone."""

import json

import pytest
from click.testing import CliRunner

import resinspect
from resinspect.cli import main
from resinspect.errors import ResinspectError
from resinspect.testing import tiny_data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = tiny_data(train=128, test=64, size=8)
    a = resinspect.run(data=data, plugins=["summary", "spectra"], epochs=1, out=root / "a", device="cpu",
                       options={"spectra": {"at_init": False}})
    b = resinspect.run(data=data, plugins=["summary", "spectra"], epochs=2, out=root / "b", device="cpu",
                       options={"spectra": {"at_init": False}})
    return root / "a", root / "b", a, b


def test_compare_lines_up_settings_and_metrics(two_runs):
    a_dir, b_dir, a, b = two_runs
    cmp = resinspect.compare([a_dir, b_dir])
    assert cmp.names == ["a", "b"]
    assert ("epochs", [1, 2]) in cmp.config  # the one setting that differs (the output folder is left out)
    key = "spectra/model/trained/median_alpha"
    ma, mb = a.section("spectra").metrics["model/trained/median_alpha"], b.section("spectra").metrics["model/trained/median_alpha"]
    assert cmp.metric(key) == [ma, mb] and cmp.difference(key) == pytest.approx(mb - ma)
    acc = cmp.metric("train/model/test_accuracy")
    assert acc == [a.results.training["model"]["epochs"][-1]["test_accuracy"],
                   b.results.training["model"]["epochs"][-1]["test_accuracy"]]
    assert key in dict(cmp.differences)
    assert "summary/parameters" not in dict(cmp.differences)  # same architecture: equal, not highlighted


def test_compare_command_writes_one_page(two_runs, tmp_path):
    a_dir, b_dir, *_ = two_runs
    out = tmp_path / "cmp.html"
    r = CliRunner().invoke(main, ["compare", str(a_dir), str(b_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert "Comparison of 2 runs" in html and "Settings that differ" in html and "epochs" in html
    assert html.count('class="differs"') >= 2 and "data:image/png;base64," in html and "Comparison complete." in html
    assert "<script" not in html


def test_compare_refuses_a_folder_that_is_not_a_run_and_another_schema(two_runs, tmp_path):
    a_dir, *_ = two_runs
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["compare", str(a_dir), str(tmp_path / "empty")])
    assert r.exit_code != 0 and "is " in r.output and "run directory" in r.output and "Traceback" not in r.output
    old = tmp_path / "old"
    old.mkdir()
    d = json.loads((a_dir / "results.json").read_text())
    d["schema_version"] = 0
    (old / "results.json").write_text(json.dumps(d))
    with pytest.raises(ResinspectError, match="schema version 0"):
        resinspect.compare([a_dir, old])
    with pytest.raises(ResinspectError, match="at least two"):
        resinspect.compare([a_dir])
