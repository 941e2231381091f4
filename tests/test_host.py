import importlib.metadata
import json

import pytest
import torch

import resinspect
from inline_plugins import Counter, Crasher, Evil, TrainCrasher
from resinspect.errors import OptionError, ResinspectError, UnknownNameError
from resinspect.plugins import PluginHost, PluginInfo, discover_entry_points
from resinspect.testing import tiny_data


def host_with(**plugins):
    host = PluginHost(available={})
    for name, obj in plugins.items():
        host.add(PluginInfo(name, obj, "test", "0", (obj.__doc__ or "").strip()))
    return host


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=128, test=64)


def test_builtin_plugins_come_through_the_entry_point_group():
    found = discover_entry_points()
    for name in ("summary", "ablation"):
        assert name in found, found.keys()
        assert found[name].source.startswith("entry point (resinspect)")
        assert found[name].plugin.__name__ == f"resinspect_plugins.{name}"
        assert found[name].version == importlib.metadata.version("resinspect")


def test_fake_third_party_entry_point_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_plugin.py").write_text(
        '"""A third-party analysis."""\nfrom resinspect import hookimpl, Section\n'
        '@hookimpl\ndef resinspect_analyze(ctx):\n    return Section("Third party")\n')
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def fake(**kw):
        eps = list(real(**kw))
        if kw.get("group") == "resinspect":
            eps += [importlib.metadata.EntryPoint("thirdparty", "thirdparty_plugin", "resinspect"),
                    importlib.metadata.EntryPoint("broken", "broken_plugin", "resinspect")]
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    host = PluginHost()
    assert host.available["thirdparty"].description == "A third-party analysis."
    assert "missing dependency xyz" in host.available["broken"].load_error
    listing = {p["name"]: p for p in host.describe()}
    assert listing["thirdparty"]["hooks"] == ["resinspect_analyze"]


def test_options_from_file_and_cli_with_cli_winning(tmp_path, data):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nepochs = 1\n[counter]\nscale = 2.0\nlabel = "calls"\n')
    result = resinspect.run(model="resnet20", data=data, plugins=["counter"], config=cfg,
                            options=["counter.scale=3"], out=tmp_path / "r", device="cpu",
                            host=host_with(counter=Counter()))
    sec = result.section("counter")
    assert sec.metrics == {"calls": 2 * 3.0, "epochs": 1}  # 128 images / batch 64 = 2 steps
    assert result.results.config["plugin_options"]["counter"] == {"scale": 3.0, "label": "calls"}
    assert "scale = 3.0" in (tmp_path / "r" / "config.toml").read_text()


@pytest.mark.parametrize("pairs,match", [
    (["counter.nope=1"], "unknown option of plugin counter 'nope'"),
    (["counter.scale=abc"], "counter.scale: 'abc' is not a valid finite float"),
    (["counter.label=bogus"], "counter.label: 'bogus' is not one of steps, calls"),
    (["countr.scale=1"], "unknown plugin 'countr'; did you mean 'counter'"),
    (["scale=1"], "expected PLUGIN.NAME=VALUE"),
])
def test_bad_options_fail_before_any_work(tmp_path, data, pairs, match):
    with pytest.raises((OptionError, UnknownNameError), match=match):
        resinspect.run(model="resnet20", data=data, plugins=["counter"], options=pairs, epochs=1,
                       out=tmp_path / "r", host=host_with(counter=Counter()))
    assert not (tmp_path / "r").exists()


def test_unknown_plugin_name_lists_valid_and_closest(tmp_path, data):
    with pytest.raises(UnknownNameError, match="unknown plugin 'countre'; did you mean 'counter'.*counter"):
        resinspect.run(data=data, plugins=["countre"], out=tmp_path / "r", host=host_with(counter=Counter()))
    assert not (tmp_path / "r").exists()


def test_failing_plugins_are_isolated(tmp_path, data):
    crasher, train_crasher = Crasher(), TrainCrasher()
    result = resinspect.run(model="resnet20", data=data, plugins=["counter", "crasher", "traincrasher"], epochs=1,
                            out=tmp_path / "r", device="cpu",
                            host=host_with(counter=Counter(), crasher=crasher, traincrasher=train_crasher))
    assert result.exit_code == 1 and result.status == "plugins_failed"
    assert result.section("counter").metrics["steps"] == 2
    assert train_crasher.calls == 1 and train_crasher.unconfigured  # disabled after the first error
    stored = json.loads((tmp_path / "r" / "results.json").read_text())
    assert stored["plugins"]["counter"]["status"] == "ok"
    assert stored["plugins"]["crasher"]["status"] == "failed"
    assert "crasher exploded" in stored["plugins"]["crasher"]["error"]
    assert "Traceback" in stored["plugins"]["crasher"]["traceback"]
    assert stored["plugins"]["traincrasher"]["failed_hook"] == "resinspect_after_backward"
    html = (tmp_path / "r" / "index.html").read_text()
    assert "crasher exploded &lt;b&gt;on purpose&lt;/b&gt;" in html and "bad gradient bookkeeping" in html
    assert "Traceback (most recent call last)" in html


def test_trace_env_logs_every_hook_call(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("RESINSPECT_TRACE_PLUGINS", "1")
    resinspect.run(data=data, plugins=["counter"], epochs=1, out=tmp_path / "r", device="cpu",
                   host=host_with(counter=Counter()))
    err = capsys.readouterr().err
    for hook in ("resinspect_configure", "resinspect_after_backward", "resinspect_epoch_end", "resinspect_analyze"):
        assert f"[resinspect] {hook} -> counter" in err


def test_plugin_from_a_file_and_a_module(tmp_path, data, monkeypatch):
    f = tmp_path / "myanalysis.py"
    f.write_text('"""Local experiment."""\nfrom resinspect import hookimpl, Section\n'
                 '@hookimpl\ndef resinspect_analyze(ctx):\n    return Section("Mine", metrics={"n": 7})\n')
    result = resinspect.run(data=data, plugins=[str(f)], epochs=0, out=tmp_path / "a", device="cpu")
    assert result.section("myanalysis").metrics == {"n": 7}
    monkeypatch.syspath_prepend(str(tmp_path))
    result = resinspect.run(data=data, plugins=["myanalysis"], epochs=0, out=tmp_path / "b", device="cpu")
    assert result.section("myanalysis").title == "Mine"
    with pytest.raises(ResinspectError, match="nothere.py: no such file"):
        resinspect.run(data=data, plugins=[str(tmp_path / "nothere.py")], out=tmp_path / "c")


def test_misspelt_hook_name_is_rejected():
    class Typo:
        @resinspect.hookimpl
        def resinspect_analyse(self, ctx):
            return None

    with pytest.raises(ResinspectError, match="resinspect_analyse"):
        host_with(typo=Typo()).activate(["typo"])


def test_python_api_with_in_memory_model_and_loader_pair(tmp_path, data):
    from torch.utils.data import DataLoader

    from helpers import UserResNet

    loaders = (DataLoader(data.train, batch_size=32, shuffle=True), DataLoader(data.test, batch_size=64))
    model = UserResNet(in_channels=1, num_classes=10)
    result = resinspect.run(model=model, data=loaders, plugins=["counter"], epochs=1, out=tmp_path / "r",
                            device="cpu", host=host_with(counter=Counter()))
    assert result.model is model and result.status == "complete"
    assert result.section("counter").metrics["steps"] == 4
    assert result.results.model["name"] == "UserResNet"
    assert len(result.results.model["residual_blocks"]) == 3
    for f in ("index.html", "results.json", "config.toml", "model.pt"):
        assert (tmp_path / "r" / f).is_file()


def test_existing_run_dir_is_not_clobbered(tmp_path, data):
    out = tmp_path / "r"
    resinspect.run(data=data, plugins=[], epochs=0, out=out, device="cpu")
    before = (out / "results.json").read_text()
    with pytest.raises(ResinspectError, match="already holds a run.*--overwrite"):
        resinspect.run(data=data, plugins=[], epochs=0, out=out, device="cpu")
    assert (out / "results.json").read_text() == before


def test_interrupted_run_never_leaves_a_complete_looking_report(tmp_path, data):
    class Interrupt:
        @resinspect.hookimpl
        def resinspect_analyze(self, ctx):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        resinspect.run(data=data, plugins=["interrupt"], epochs=1, out=tmp_path / "r", device="cpu",
                       host=host_with(interrupt=Interrupt()))
    assert not (tmp_path / "r" / "index.html").exists()
    stored = json.loads((tmp_path / "r" / "results.json").read_text())
    # not "running" forever: a reader can tell a dead run from a live one, and where it stopped
    assert stored["status"] == "interrupted" and stored["run"]["phase"] == "analyze"
    assert "Ctrl-C" in stored["error"]
    assert not list((tmp_path / "r").glob(".*.tmp"))


def test_a_run_stopped_during_the_analysis_keeps_every_finished_plugin(tmp_path, data):
    class Interrupt:
        @resinspect.hookimpl
        def resinspect_analyze(self, ctx):
            raise KeyboardInterrupt

    plugins = ["counter", "interrupt", "crasher"]
    with pytest.raises(KeyboardInterrupt):
        resinspect.run(data=data, plugins=plugins, epochs=1, out=tmp_path / "r", device="cpu",
                       host=host_with(counter=Counter(), interrupt=Interrupt(), crasher=Crasher()))
    stored = resinspect.Results.read(tmp_path / "r")  # a valid results.json, as it was written
    assert stored.status == "interrupted" and stored.run.phase == "analyze"
    assert list(stored.plugins) == ["counter"] and stored.plugins["counter"].status == "ok"
    steps = len(stored.training["model"]["step_losses"])  # the training curves are kept too
    assert steps > 0 and stored.plugins["counter"].sections[0].metrics["steps"] == steps  # the finished section
    assert len(stored.training["model"]["epochs"]) == 1  # and the training curves
    from resinspect.rundir import render_run

    page = render_run(tmp_path / "r").read_text()  # `resinspect report` on it
    assert "Not in this report" in page and "interrupt, crasher" in page and "Report complete." not in page


def test_diverged_training_is_reported_as_failed(tmp_path, data):
    from helpers import UserResNet

    model = UserResNet()
    with torch.no_grad():
        model.head.weight.fill_(1e38)  # the logits overflow: the loss is not finite at the first step
    result = resinspect.run(model=model, data=data, plugins=["counter"], epochs=2, optimizer="sgd",
                            out=tmp_path / "r", device="cpu", host=host_with(counter=Counter()))
    assert result.status == "failed" and result.exit_code == 1
    assert "the loss became" in result.results.error
    html = (tmp_path / "r" / "index.html").read_text()
    assert 'content="failed"' in html and "The run failed" in html and "Report complete" not in html


def test_html_escapes_every_plugin_string(tmp_path, data):
    resinspect.run(data=data, plugins=["evil"], epochs=0, out=tmp_path / "r", device="cpu",
                   host=host_with(evil=Evil()))
    html = (tmp_path / "r" / "index.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html and "<b>t</b>" not in html
    assert "&lt;script&gt;alert(&#39;finding&#39;)&lt;/script&gt;" in html


@pytest.mark.parametrize("text,match", [
    ("[run\nmodel = 1", "run.toml: not valid TOML"),
    ("[run]\nmodle = 'resnet20'\n", r"run.toml: unknown key\(s\) in \[run\]: modle"),
    ("[train]\nlearning_rate = 0.1\n", r"run.toml: unknown key\(s\) in \[train\]: learning_rate"),
    ("[counter]\nscale = 'big'\n", "counter.scale: 'big' is not a valid finite float"),
])
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, data, text, match):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    with pytest.raises((ResinspectError, OptionError), match=match):
        resinspect.run(data=data, plugins=["counter"], config=cfg, out=tmp_path / "r",
                       host=host_with(counter=Counter()))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ResinspectError, match="nope.toml: no such file"):
        resinspect.run(data=data, config=tmp_path / "nope.toml", out=tmp_path / "r")
