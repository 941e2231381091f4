"""The run directory as a user sees it: results.json schema, TensorBoard, the HTML report in a real browser."""

import json
import shutil
from pathlib import Path

import pytest

import resinspect
from helpers import open_in_browser
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
    # one TensorBoard run per network, so `tensorboard --logdir RUN/tb` overlays them
    assert list((run_dir / "tb" / "model").glob("events.out.tfevents.*"))
    assert list((run_dir / "tb" / "twin").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob(".*.tmp"))


def test_results_json_matches_the_documented_schema(run_dir):
    import jsonschema

    schema = json.loads((ROOT / "resinspect" / "results-schema.json").read_text())
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


def _accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_read_back(run_dir):
    model, twin = _accumulator(run_dir / "tb" / "model"), _accumulator(run_dir / "tb" / "twin")
    scalars, twin_scalars = set(model.Tags()["scalars"]), set(twin.Tags()["scalars"])
    results = json.loads((run_dir / "results.json").read_text())
    for acc, role in ((model, "model"), (twin, "twin")):
        logged = [e.value for e in acc.Scalars("train/loss")]
        assert logged == pytest.approx(results["training"][role]["step_losses"], rel=1e-6)
    # the two networks overlay: the same tags in both runs
    shared = {"train/loss", "train/test_accuracy", "counter/epoch_test_accuracy", "summary/residual_blocks",
              "train/train_loss"}
    assert shared <= scalars and shared <= twin_scalars
    assert any(t.startswith("gradflow/grad_norm/") for t in scalars & twin_scalars)
    assert {"counter/steps", "ablation/clean_accuracy", "ablation/lesion_accuracy"} <= scalars
    assert model.Scalars("ablation/clean_accuracy")[0].value == pytest.approx(
        results["plugins"]["ablation"]["sections"][0]["metrics"]["clean_accuracy"])
    assert [e.value for e in model.Scalars("counter/steps")] == [8.0]  # (model + twin) x 2 epochs x 2 steps
    # the training section's model/... and twin/... metrics land in their own network's run
    assert model.Scalars("train/test_accuracy")[-1].value == pytest.approx(
        results["training"]["model"]["epochs"][-1]["test_accuracy"])
    # every tag is <plugin-or-core>/<name>
    plugins = set(results["plugins"]) | {"train", "dossier", "hparams"}
    for acc in (model, twin):
        assert all(tag.split("/")[0] in plugins for tag in set(acc.Tags()["scalars"]) | set(acc.Tags()["images"]))
    assert any(t.startswith("ablation/figure/") for t in model.Tags()["images"])
    # summary returns one section per network: each in its own run under the same tag
    assert [e.value for e in model.Scalars("summary/residual_blocks")] == [9.0]
    assert [e.value for e in twin.Scalars("summary/residual_blocks")] == [0.0]


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




@pytest.mark.browser
def test_report_in_a_real_browser(run_dir):
    results = json.loads((run_dir / "results.json").read_text())

    def check(page):
        plugins_shown = set(page.eval_on_selector_all("section.plugin", "els => els.map(e => e.dataset.plugin)"))
        assert plugins_shown == set(results["plugins"]) | {"core", "dossier"}
        assert page.inner_text("#run-status") == "complete, with failed plugins"
        assert "crasher exploded" in page.inner_text("#failures")
        summary_items = page.eval_on_selector_all("#summary-list li", "els => els.length")
        assert summary_items >= 3
        # MathML renders (no raw markup shown as text)
        assert "<math" not in page.inner_text("#explainer")
        # the torchinfo layer table is folded: closed at first, its rows hidden, and it opens on a click
        folded = page.locator("details.folded-table").first
        assert folded.get_attribute("open") is None
        first_row = folded.locator("tbody tr").first
        assert not first_row.is_visible()
        folded.locator("summary").click()
        assert folded.get_attribute("open") is not None and first_row.is_visible()

    # no console or page errors, every image decodes (open_in_browser), and one image per figure
    n_figures = sum(len(s["figures"]) for p_ in results["plugins"].values() for s in p_["sections"])
    n_figures += sum(len(s["figures"]) for s in results["core_sections"])
    assert open_in_browser(run_dir / "index.html", check) == n_figures > 3
