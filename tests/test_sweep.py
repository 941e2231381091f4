"""resinspect sweep: a grid of (model, seed) runs, aggregated; resumable; parallel; its report."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import resinspect
from resinspect.cli import main
from resinspect.errors import ResinspectError
from resinspect.results import Results
from resinspect.sweep import aggregate, read_sweep

GRID = dict(models=["resnet8", "resnet14"], seeds=[0, 1])
COMMON = dict(twin=True, epochs=1, plugins=["ablation", "gradflow"], data="digits", device="cpu")
DATA_ARGS = {"size": 8}


def _settings(**extra):
    s = resinspect.RunSettings(**{**COMMON, **extra})
    s.data_args = dict(DATA_ARGS)
    return s


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "depths"
    result = resinspect.sweep(**GRID, out=root, settings=_settings(), options=["ablation.k_max=2"])
    return root, result


def test_sweep_writes_one_ordinary_run_per_combination(swept):
    root, result = swept
    assert [(r.model, r.seed, r.status) for r in result.runs] == [
        ("resnet8", 0, "complete"), ("resnet8", 1, "complete"), ("resnet14", 0, "complete"), ("resnet14", 1, "complete")]
    assert result.exit_code == 0
    for r in result.runs:
        res = Results.read(root / r.path)  # an ordinary run directory
        assert res.config["model"] == r.model and res.config["seed"] == r.seed and res.config["twin"] is True
        assert res.config["plugin_options"]["ablation"]["k_max"] == 2  # -o reaches every run
        assert (root / r.path / "index.html").is_file()
    doc = read_sweep(root)
    assert doc["status"] == "complete" and doc["grid"] == {"models": GRID["models"], "seeds": GRID["seeds"]}
    assert [x["path"] for x in doc["runs"]] == ["resnet8-seed0", "resnet8-seed1", "resnet14-seed0", "resnet14-seed1"]


def test_aggregate_is_the_mean_and_std_of_the_runs_results(swept):
    root, result = swept
    fam = read_sweep(root)["aggregate"]["families"]
    assert sorted(fam) == ["plain", "residual"] and sorted(fam["residual"], key=int) == ["8", "14"]
    for model, depth in (("resnet8", "8"), ("resnet14", "14")):
        runs = [Results.read(root / f"{model}-seed{s}") for s in (0, 1)]
        err = [1 - r.training["model"]["epochs"][-1]["test_accuracy"] for r in runs]
        twin_err = [1 - r.training["twin"]["epochs"][-1]["test_accuracy"] for r in runs]
        cost = [r.metrics()["ablation/median_lesion_cost_points"] for r in runs]
        ratio = [r.metrics()["gradflow/twin/first_last_ratio_median"] for r in runs]
        got = fam["residual"][depth]
        assert got["test_error"]["mean"] == pytest.approx(statistics.fmean(err), abs=1e-12)
        assert got["test_error"]["std"] == pytest.approx(statistics.stdev(err), abs=1e-12)
        assert got["test_error"]["n"] == 2
        assert got["ablation/median_lesion_cost_points"]["mean"] == pytest.approx(statistics.fmean(cost))
        assert got["ablation/median_lesion_cost_points"]["std"] == pytest.approx(statistics.stdev(cost))
        # the twin of resnet<d> is the plain network of depth d
        assert fam["plain"][depth]["test_error"]["mean"] == pytest.approx(statistics.fmean(twin_err))
        assert fam["plain"][depth]["gradflow/first_last_ratio_median"]["std"] == pytest.approx(statistics.stdev(ratio))
    # aggregate() recomputes the same numbers from the folder
    again = aggregate(root, result.runs)
    assert again["families"] == json.loads(json.dumps(again["families"]))
    assert again["families"]["plain"]["14"]["test_error"] == pytest.approx(fam["plain"]["14"]["test_error"])


def test_sweep_report_shows_error_against_depth_and_findings(swept):
    root, result = swept
    html = (root / "index.html").read_text()
    agg = read_sweep(root)["aggregate"]
    assert "Test error against depth" in html and "Sweep report complete." in html and "<script" not in html
    te = agg["families"]["plain"]["14"]["test_error"]
    assert f"{100 * te['mean']:.2f}% ± {100 * te['std']:.2f}" in html  # the Table 6-style row
    assert html.count("data:image/png;base64,") >= 4  # error vs depth, curves, ablation, gradflow
    texts = [f["text"] for f in agg["findings"]]
    assert any(t.startswith("The plain networks") for t in texts)
    assert any(t.startswith("The residual networks") for t in texts)
    assert any("Shortcuts' advantage" in t for t in texts)
    for r in result.runs:
        assert f'href="{r.path}/index.html"' in html


def test_rerun_keeps_complete_runs_and_refuses_other_settings(swept, tmp_path):
    root, result = swept
    stamp = {r.path: (root / r.path / "results.json").stat().st_mtime_ns for r in result.runs}
    again = resinspect.sweep(**GRID, out=root, settings=_settings(), options=["ablation.k_max=2"])
    assert all(r.reused for r in again.runs)
    assert {r.path: (root / r.path / "results.json").stat().st_mtime_ns for r in again.runs} == stamp
    with pytest.raises(ResinspectError, match=r"other settings.*epochs = 1 \(now 2\)"):
        resinspect.sweep(**GRID, out=root, settings=_settings(epochs=2), options=["ablation.k_max=2"])


def test_interrupted_sweep_resumes_exactly_the_rest(tmp_path):
    root = tmp_path / "sw"
    cmd = [sys.executable, "-m", "resinspect", "sweep", "--models", "resnet8,resnet14", "--seeds", "0,1",
           "--epochs", "1", "--plugins", "summary", "--data-arg", "size=8", "--device", "cpu", "--out", str(root),
           "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                runs = json.loads((root / "sweep.json").read_text())["runs"]
            except (OSError, ValueError):
                runs = []
            if runs and runs[0]["status"] == "complete":
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the first run did not complete in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = (root / "resnet8-seed0" / "results.json").stat().st_mtime_ns
    assert read_sweep(root)["status"] == "running"  # killed: never marked complete
    r = CliRunner().invoke(main, cmd[3:-1])
    assert r.exit_code == 0, r.output
    assert "resnet8 seed 0: already complete, kept" in r.output
    assert f"tensorboard --logdir {root}" in r.output  # the sweep folder is one logdir
    ran = [line for line in r.output.splitlines() if line.startswith("[")]
    assert ran == ["[1/3] resnet8 seed 1 ...", "[2/3] resnet14 seed 0 ...", "[3/3] resnet14 seed 1 ..."]
    assert (root / "resnet8-seed0" / "results.json").stat().st_mtime_ns == first
    doc = read_sweep(root)
    assert doc["status"] == "complete" and [x["reused"] for x in doc["runs"]] == [True, False, False, False]
    assert all(Results.read(root / x["path"]).status == "complete" for x in doc["runs"])


def test_parallel_jobs_divide_the_threads(tmp_path):
    ncpu = len(os.sched_getaffinity(0))
    result = resinspect.sweep(["resnet8"], [0, 1], out=tmp_path / "par", jobs=2,
                              settings=_settings(plugins=["summary"], twin=False))
    assert [r.status for r in result.runs] == ["complete", "complete"]
    for r in result.runs:
        assert Results.read(tmp_path / "par" / r.path).environment["torch_threads"] == max(1, ncpu // 2)
    # the same seeds give the same numbers as a one-process sweep (CPU, deterministic training)
    one = resinspect.sweep(["resnet8"], [0, 1], out=tmp_path / "one", jobs=1,
                           settings=_settings(plugins=["summary"], twin=False))
    for a, b in zip(result.runs, one.runs):
        ra, rb = Results.read(tmp_path / "par" / a.path), Results.read(tmp_path / "one" / b.path)
        assert ra.training["model"]["epochs"][-1]["test_accuracy"] == pytest.approx(
            rb.training["model"]["epochs"][-1]["test_accuracy"], abs=0.02)


def test_bad_sweep_input_is_one_clear_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["sweep", "--models", "resnet20,resnet21", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown model 'resnet21'" in r.output and "resnet20" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()
    r = runner.invoke(main, ["sweep", "--models", "resnet8", "--seeds", "0,a", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "'a' is not an integer" in r.output
    r = runner.invoke(main, ["sweep", "--models", "resnet8", "--plugins", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown plugin 'nope'" in r.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = runner.invoke(main, ["sweep", "--models", "resnet8", "--out", str(tmp_path / "busy")])
    assert r.exit_code == 1 and "not a sweep folder" in r.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.browser
def test_sweep_report_and_compare_page_in_a_real_browser(swept, tmp_path):
    from helpers import open_in_browser

    root, result = swept

    def sweep_page(page):
        assert "Test error against depth" in page.inner_text("#degradation")
        assert page.eval_on_selector_all("ul.findings li", "els => els.length") >= 3
        folded = page.locator("details.folded-table").first
        assert folded.get_attribute("open") is None
        folded.locator("summary").click()
        assert folded.locator("tbody tr").first.is_visible()
        page.click(f'a[href="{result.runs[0].path}/index.html"]')  # a run's own report opens from the sweep
        page.wait_for_load_state("load")
        assert "Per-block dossier" in page.inner_text("body")

    assert open_in_browser(root / "index.html", sweep_page) >= 4
    out = tmp_path / "cmp.html"
    r = CliRunner().invoke(main, ["compare", str(root / "resnet8-seed0"), str(root / "resnet14-seed0"), "--out", str(out)])
    assert r.exit_code == 0, r.output

    def compare_page(page):
        assert page.eval_on_selector_all("td.differs", "els => els.length") > 0
        assert "Per-block dossier" in page.inner_text("body") and "ablation/lesion cost (points)" in page.inner_text("body")

    assert open_in_browser(out, compare_page) >= 2


def _wait_for_runs(tb, n):
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(tb.get("/data/runs")) >= n and len(tb.session_groups()) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"tensorboard did not load {n} runs: {tb.get('/data/runs')}")


def test_tensorboard_server_shows_the_sweep_as_one_hparams_table(swept):
    """The sweep folder is one logdir: the real TensorBoard server, asked over HTTP as its HParams tab asks,
    gives a session per network with its depth, family and final test error, equal to results.json's."""
    from helpers import TensorBoardServer

    from resinspect.results import network_values

    root, result = swept
    with TensorBoardServer(root) as tb:
        _wait_for_runs(tb, 8)
        experiment = tb.post("/data/plugin/hparams/experiment", {"experimentName": ""})
        assert [h["name"] for h in experiment["hparamInfos"]][:3] == ["depth", "model", "residual"]
        assert experiment["metricInfos"][0]["name"]["tag"] == "hparams/test_error"
        groups = {g["name"]: g for g in tb.session_groups()}
        assert len(groups) == 8  # 2 depths x 2 seeds x (residual, plain)
        for r in result.runs:
            values = network_values(Results.read(root / r.path))
            for role, family in (("model", True), ("twin", False)):
                g = groups[f"{r.path}/tb/{role}"]
                assert g["hparams"]["residual"] is family and g["hparams"]["seed"] == r.seed
                assert g["hparams"]["depth"] == int(r.model.removeprefix("resnet"))
                assert g["hparams"]["model"] == (r.model if family else r.model.replace("resnet", "plain"))
                metric = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
                assert metric["hparams/test_error"] == pytest.approx(values[role]["test_error"])
        # the scalars tab's data, from the same server
        losses = tb.get(f"/data/plugin/scalars/scalars?run={result.runs[0].path}/tb/twin&tag=train/loss")
        stored = Results.read(root / result.runs[0].path).training["twin"]["step_losses"]
        assert [v for _, _, v in losses] == pytest.approx(stored, rel=1e-6)


@pytest.mark.browser
def test_tensorboard_hparams_tab_in_a_real_browser(swept):
    """TensorBoard's own HParams page, in headless chromium, lists every network of the sweep."""
    from helpers import TensorBoardServer, chromium
    from playwright.sync_api import sync_playwright

    root, result = swept
    with TensorBoardServer(root) as tb, sync_playwright() as p:
        _wait_for_runs(tb, 8)
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 600})
            page.goto(tb.url + "#hparams")
            for name in ("resnet8", "plain8", "resnet14", "plain14"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            assert page.get_by_text("test_error", exact=True).first.is_visible()
        finally:
            browser.close()


def test_report_command_re_renders_a_sweep(swept, tmp_path):
    import shutil

    root, _ = swept
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    original = (copy / "index.html").read_text()
    (copy / "index.html").unlink()
    r = CliRunner().invoke(main, ["report", str(copy)])
    assert r.exit_code == 0, r.output
    assert (copy / "index.html").read_text() == original.replace(str(root), str(copy))


def test_a_plain_family_at_chance_at_every_depth_is_not_called_undegraded():
    from resinspect.sweep import degradation_findings

    def at(err):
        return {"test_error": {"mean": err, "std": 0.0, "n": 1, "values": [err]}}

    families = {"plain": {"4": at(0.80), "12": at(0.80)}, "residual": {"4": at(0.35), "12": at(0.377)}}
    found = degradation_findings(families, {}, classes=5)
    assert found[0]["severity"] == "warning"
    assert "learned nothing at any depth" in found[0]["text"] and "80.0% with 5 classes" in found[0]["text"]
    # with 10 classes, 80% error is above chance (90%): the ordinary "no clear degradation" finding
    assert "no clear degradation" in degradation_findings(families, {}, classes=10)[0]["text"]
