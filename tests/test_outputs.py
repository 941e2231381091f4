"""The run directory as a user sees it: results.json schema, TensorBoard, the HTML report in a real browser."""

import json
import os
import shutil
from pathlib import Path

import pytest

import resinspect
from inline_plugins import Counter, Crasher
from resinspect.plugins import PluginHost, discover_entry_points
from resinspect.rundir import render_run
from resinspect.testing import tiny_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    host = PluginHost()
    from resinspect.plugins import PluginInfo
    host.add(PluginInfo("counter", Counter(), "test"))
    host.add(PluginInfo("crasher", Crasher(), "test"))
    plugins = ["summary", "ablation", "counter", "crasher"] + [p for p in ("activations", "gradflow", "weights")
                                                              if p in host.available]
    result = resinspect.run(model="resnet20", data=tiny_data(train=128, test=64), plugins=plugins, epochs=2,
                            twin=True, out=out, device="cpu", host=host,
                            options={"ablation": {"k_max": 2, "subsets": 2}})
    assert result.status == "plugins_failed"
    return out


def test_run_directory_layout(run_dir):
    for name in ("index.html", "results.json", "config.toml", "model.pt", "twin.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob(".*.tmp"))


def test_results_json_matches_the_documented_schema(run_dir):
    import jsonschema

    schema = json.loads((ROOT / "docs" / "results-schema.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    jsonschema.validate(results, schema)
    assert results["model"]["twin"]["name"] == "plain20" and results["model"]["twin"]["residual_blocks"] == 0
    assert len(results["model"]["residual_blocks"]) == 9
    assert results["plugins"]["crasher"]["status"] == "failed"
    assert results["plugins"]["ablation"]["status"] == "ok"
    assert results["training"]["model"]["epochs"][-1]["epoch"] == 2
    for plugin in results["plugins"].values():
        for section in plugin["sections"]:
            for fig in section["figures"]:
                assert (run_dir / fig["file"]).is_file()


def test_tensorboard_events_read_back(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    results = json.loads((run_dir / "results.json").read_text())
    losses = results["training"]["model"]["step_losses"]
    logged = [e.value for e in acc.Scalars("train/model/loss")]
    assert logged == pytest.approx(losses, rel=1e-6)
    assert {"train/twin/loss", "train/model/test_accuracy", "counter/steps", "counter/epoch_test_accuracy",
            "ablation/clean_accuracy", "ablation/lesion_accuracy"} <= scalars
    assert acc.Scalars("ablation/clean_accuracy")[0].value == pytest.approx(
        results["plugins"]["ablation"]["sections"][0]["metrics"]["clean_accuracy"])
    assert [e.value for e in acc.Scalars("counter/steps")] == [8.0]  # (model + twin) x 2 epochs x 2 steps
    # every tag is <plugin-or-core>/<name>
    plugins = set(results["plugins"]) | {"train"}
    assert all(tag.split("/")[0] in plugins for tag in scalars | set(acc.Tags()["images"]))
    assert any(t.startswith("ablation/figure/") for t in acc.Tags()["images"])
    # summary returns one section per network: the twin's goes under summary/section1/, no step-0 duplicates
    assert [e.value for e in acc.Scalars("summary/residual_blocks")] == [9.0]
    assert [e.value for e in acc.Scalars("summary/section1/residual_blocks")] == [0.0]


def test_report_rerenders_identically_from_stored_results(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    original = (copy / "index.html").read_text()
    (copy / "index.html").unlink()
    render_run(copy)
    assert (copy / "index.html").read_text() == original


def test_report_is_self_contained(run_dir):
    html = (run_dir / "index.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert "<script" not in html
    assert 'content="plugins_failed"' in html and "Report complete." in html


def _chromium():
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(path):
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it")
    pytest.skip("chromium not installed (apt-get install chromium)")


@pytest.mark.browser
def test_report_in_a_real_browser(run_dir):
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    results = json.loads((run_dir / "results.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((run_dir / "index.html").as_uri())
            page.wait_for_load_state("load")
            assert errors == []
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({ok: e.complete && e.naturalWidth > 0, alt: e.alt}))")
            n_figures = sum(len(s["figures"]) for p_ in results["plugins"].values() for s in p_["sections"])
            n_figures += sum(len(s["figures"]) for s in results["core_sections"])
            assert len(images) == n_figures > 3 and all(i["ok"] for i in images), images
            plugins_shown = set(page.eval_on_selector_all("section.plugin", "els => els.map(e => e.dataset.plugin)"))
            assert plugins_shown == set(results["plugins"]) | {"core"}
            assert page.inner_text("#run-status") == "complete, with failed plugins"
            assert "crasher exploded" in page.inner_text("#failures")
            summary_items = page.eval_on_selector_all("#summary-list li", "els => els.length")
            assert summary_items >= 3
            # MathML renders (no raw markup shown as text)
            assert "<math" not in page.inner_text("#explainer")
        finally:
            browser.close()
