"""The core's shape: the settings table, the results model, probes, the public plugin API, the generic
plain twin, output errors and the plugin-author fixes."""

import ast
import gc
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import resinspect
from resinspect import probes
from resinspect.cli import build_cli, main
from resinspect.errors import ResinspectError, UnknownNameError
from resinspect.plugins import PluginHost, PluginInfo
from resinspect.results import Results
from resinspect.settings import SETTINGS, RunSettings, Setting
from resinspect.testing import TwoBlockNet, make_context, run_plugin, tiny_data

from helpers import UserResNet

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data-arg", "size=8", "--epochs", "1", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=64, test=32)


# -- bugs ----------------------------------------------------------------------------------------------
def test_a_plugin_named_in_a_config_file_is_checked_like_one_from_the_command_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nplugins = ["summary", "ablaton"]\n')
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1
    assert "unknown plugin 'ablaton'; did you mean 'ablation'?" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("out", ["/proc/resinspect-test/run", "/proc/version/run"])
def test_an_output_folder_that_cannot_be_created_is_one_line_and_no_traceback(out):
    result = CliRunner().invoke(main, ["run", "--plugins", "summary", "--out", out] + FAST)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: output {out}: cannot ")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not isinstance(result.exception, OSError)


def test_a_write_failure_midway_marks_the_run_failed_and_writes_no_report(tmp_path, data, monkeypatch):
    from resinspect import rundir

    real = rundir.write_atomic

    def full_disk(path, payload):
        if Path(path).name == "index.html":
            raise rundir.output_error(path, "write", OSError(28, "No space left on device"))
        real(path, payload)

    monkeypatch.setattr("resinspect.runner.write_atomic", full_disk)
    with pytest.raises(ResinspectError, match="No space left on device"):
        resinspect.run(data=data, plugins=["summary"], epochs=0, out=tmp_path / "r", device="cpu")
    assert not (tmp_path / "r" / "index.html").exists()
    stored = json.loads((tmp_path / "r" / "results.json").read_text())
    assert stored["status"] == "failed" and stored["run"]["phase"] == "write"


def test_unknown_option_message_reads_right():
    result = CliRunner().invoke(main, ["run", "--plugins", "ablation", "-o", "ablation.sampels=3"] + FAST)
    assert "unknown option of plugin ablation 'sampels'; did you mean 'samples'?" in result.output
    assert "Valid options of plugin ablation: " in result.output


# -- settings table ------------------------------------------------------------------------------------
def test_one_table_row_becomes_a_cli_option_a_config_key_and_a_config_toml_entry(tmp_path):
    row = Setting("label_smoothing", float, 0.0, "Label smoothing of the loss (a test-only setting).",
                  check=lambda v: "must be in [0, 1)" if not 0 <= v < 1 else None)
    rows = SETTINGS + [row]
    cli = build_cli(rows)
    assert "--label-smoothing" in CliRunner().invoke(cli, ["run", "--help"]).output
    s = RunSettings(rows)
    assert s.label_smoothing == 0.0
    # command line
    seen = {}

    def fake_run(settings=None, **kw):
        seen["settings"] = settings
        raise ResinspectError("stop here")

    import resinspect.runner
    original = resinspect.runner.run
    resinspect.runner.run = fake_run
    try:
        result = CliRunner().invoke(cli, ["run", "--label-smoothing", "0.1"])
    finally:
        resinspect.runner.run = original
    assert "stop here" in result.output and seen["settings"].label_smoothing == 0.1
    # config file key, with its check
    cfg = tmp_path / "c.toml"
    cfg.write_text("[run]\nlabel_smoothing = 0.2\n")
    assert RunSettings.from_config(cfg, rows).label_smoothing == 0.2
    cfg.write_text("[run]\nlabel_smoothing = 2.0\n")
    with pytest.raises(ResinspectError, match=r"label_smoothing = 2.0: must be in \[0, 1\)"):
        RunSettings.from_config(cfg, rows)
    # config.toml
    import tomllib
    s.label_smoothing = 0.3
    assert tomllib.loads(__import__("resinspect.rundir").rundir.dump_toml(s.to_toml_dict({})))["run"][
        "label_smoothing"] == 0.3


def test_run_keywords_come_from_the_table(tmp_path, data):
    with pytest.raises(TypeError, match="unknown argument"):
        resinspect.run(data=data, plugins=[], bogus=1)
    result = resinspect.run(data=data, plugins=[], epochs=1, out=tmp_path / "r", device="cpu", momentum=0.5,
                            optimizer="sgd")
    assert result.results.config["train"]["momentum"] == 0.5 and result.results.config["train"]["optimizer"] == "sgd"


def test_no_core_function_has_more_than_45_statements():
    """Short functions, counted in statements (lines on which a statement starts), so that the formatter's
    one-argument-per-line layout of a long call does not count as length."""
    long = []
    for path in (ROOT / "resinspect").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len({s.lineno for s in ast.walk(node) if isinstance(s, ast.stmt)})
                if n > 45:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({n} statements)")
    assert not long, long


# -- results model -------------------------------------------------------------------------------------
def test_results_round_trip_and_other_schema_versions_are_refused(tmp_path, data):
    result = resinspect.run(data=data, plugins=["summary"], epochs=1, out=tmp_path / "r", device="cpu")
    back = Results.read(tmp_path / "r")
    assert back.to_dict() == Results.read(tmp_path / "r").to_dict()
    assert back.plugins["summary"].sections[0].metrics == result.section("summary").metrics
    assert back.metrics()["train/model/test_accuracy"] == result.results.training["model"]["epochs"][-1][
        "test_accuracy"]
    stored = json.loads((tmp_path / "r" / "results.json").read_text())
    stored["schema_version"] = 2
    (tmp_path / "r" / "results.json").write_text(json.dumps(stored))
    with pytest.raises(ResinspectError, match="schema version 2, but this resinspect .* reads version 1 only"):
        Results.read(tmp_path / "r")
    stored["schema_version"] = 1
    del stored["status"]
    (tmp_path / "r" / "results.json").write_text(json.dumps(stored))
    with pytest.raises(ResinspectError, match="does not match the results schema"):
        Results.read(tmp_path / "r")


# -- probes --------------------------------------------------------------------------------------------
def test_capture_gives_inputs_and_outputs_and_removes_its_hooks_also_on_error():
    net = TwoBlockNet(a=0.5, b=-0.25)
    blocks = resinspect.residual_blocks(net)
    x = torch.ones(2, 4)
    with probes.capture(blocks) as seen:
        net(x)
    assert torch.allclose(seen.inputs["b2"], 1.5 * x) and torch.allclose(seen.outputs["b2"], 1.5 * 0.75 * x)
    with pytest.raises(RuntimeError, match="boom"):
        with probes.capture(blocks), probes.on_forward(blocks, lambda *a: None, before=True):
            assert probes.hooks_left(net)
            raise RuntimeError("boom")
    assert probes.hooks_left(net) == []


def test_block_vjp_parts_add_up_to_the_autograd_input_gradient():
    torch.manual_seed(0)
    net = UserResNet(in_channels=1, width=4, depth=2).double().eval()
    block = resinspect.residual_blocks(net)[0]
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    (full,) = torch.autograd.grad(block.module(x), x, u)
    lin = probes.BlockLinearization(block, x)
    skip, branch = lin.vjp(u)
    assert torch.allclose(skip, u)  # identity shortcut, no post-activation
    assert torch.allclose(skip + branch, full, atol=1e-12)
    skip2, branch2 = lin.vjp(2 * u)  # the same linearisation pulls back any cotangent
    assert torch.allclose(branch2, 2 * branch, atol=1e-12)


def test_type_checks():
    assert probes.is_batchnorm(nn.BatchNorm2d(3)) and probes.is_batchnorm(nn.BatchNorm1d(3))
    assert not probes.is_batchnorm(nn.LayerNorm(3))
    assert probes.is_conv(nn.Conv1d(1, 1, 1)) and probes.is_conv(nn.ConvTranspose2d(1, 1, 1))
    assert probes.is_linear(nn.Linear(1, 1)) and not probes.is_conv(nn.Linear(1, 1))


@pytest.mark.parametrize("plugin", ["summary", "activations", "formulas", "gradflow", "weights", "ablation",
                                    "attribution"])
def test_no_hook_is_left_after_a_builtin_plugin_also_after_a_forced_failure(plugin, data, tmp_path,
                                                                            monkeypatch):
    opts = {"ablation": {"k_max": 1, "subsets": 1, "bn_batches": 1},
            "attribution": {"images": 2, "ig_steps": 2, "sanity_images": 2, "methods": ["saliency", "gradcam"]}}
    result = resinspect.run(data=data, plugins=[plugin], epochs=1, twin=True, out=tmp_path / "ok", device="cpu",
                            options=opts)
    assert result.status == "complete"
    probes.assert_clean(result.model, result.twin)

    # fail in the middle of the analysis (the second convolution call), while the plugin's probes are attached
    boom = {"n": 0}
    original = nn.Conv2d.forward

    def failing_forward(self, x):
        boom["n"] += 1
        if boom["n"] > 1:
            raise RuntimeError("forced failure inside a probe")
        return original(self, x)

    from resinspect.models import build_model

    net = build_model("resnet20", data.in_channels, data.num_classes, data.image_size)
    monkeypatch.setattr(nn.Conv2d, "forward", failing_forward)
    training_time = plugin in ("gradflow", "weights")  # their probes are attached while training
    try:
        failed = resinspect.run(model=net, data=data, plugins=[plugin], epochs=1 if training_time else 0,
                                out=tmp_path / "fail", device="cpu", options=opts)
    except RuntimeError as e:
        assert training_time and "forced failure" in str(e)  # training itself failed: the run stops
    else:
        assert failed.results.plugins[plugin].status == "failed"
    finally:
        monkeypatch.undo()
    probes.assert_clean(net)


# -- public API ----------------------------------------------------------------------------------------
def test_builtin_plugins_import_only_public_resinspect_names():
    public = set(resinspect.__all__)
    bad = []
    for path in (ROOT / "plugins").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resinspect"):
                if node.module == "resinspect":
                    bad += [f"{path.name}: {a.name}" for a in node.names if a.name not in public]
                elif not node.module.startswith("resinspect_plugins"):
                    bad.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                bad += [f"{path.name}: import {a.name}" for a in node.names
                        if a.name.startswith("resinspect.")]
    assert not bad, bad
    for name in public:
        assert hasattr(resinspect, name), name


def test_context_options_are_bound_and_unknown_names_fail(data):
    ctx = make_context("resnet20", data=data, options={"ablation": {"samples": 7}}, plugin="ablation")
    assert ctx.options()["samples"] == 7
    assert ctx.options("attribution")["images"] > 0  # every installed plugin's defaults applied
    with pytest.raises(UnknownNameError, match="unknown plugin in this run 'ablaton'"):
        ctx.options("ablaton")
    assert ctx.label("model") == "resnet20" and ctx.label("twin") == "twin"


def test_run_plugin_leaves_nothing_behind(data):
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("resinspect-test-*"))
    section = run_plugin("summary", data=data, epochs=0, options={"summary": {"depth": 2}})
    assert section.metrics["residual_blocks"] == 9
    assert set(Path(tempfile.gettempdir()).glob("resinspect-test-*")) == before


def test_twin_counterparts(data):
    ctx = make_context("resnet20", data=data, twin="plain20")
    pairs = ctx.twin_counterparts()
    assert len(pairs) == 9 and all(t is ctx.twin.get_submodule(b.name) for b, t in pairs)


# -- a plain twin for any residual model ---------------------------------------------------------------
@pytest.mark.parametrize("model,blocks", [("torchvision:resnet18", 8), ("helpers:user_resnet", 3)])
def test_any_residual_model_gets_a_plain_twin(model, blocks, data, tmp_path):
    result = resinspect.run(model=model, data=data, twin=True, plugins=["summary"], epochs=1, out=tmp_path / "r",
                            device="cpu")
    assert result.status == "complete"
    assert result.results.model["twin"]["name"] == f"plain:{model}"
    assert len(resinspect.residual_blocks(result.model)) == blocks
    assert resinspect.residual_blocks(result.twin) == []
    # the same architecture without shortcuts: every branch parameter matches the model's at initialisation
    twin_names = set(dict(result.twin.named_parameters()))
    model_names = set(dict(result.model.named_parameters()))
    assert twin_names <= model_names and all("downsample" not in n for n in twin_names)
    if model.startswith("torchvision"):  # its projection shortcuts are gone from the twin
        assert any("downsample" in n for n in model_names - twin_names)
    assert "twin.pt" in {p.name for p in result.run_dir.iterdir()}


def test_a_model_without_blocks_is_refused_a_twin(data, tmp_path):
    with pytest.raises(ValueError, match=r"has no residual blocks \(a plain network, .*\), so it has no plain twin"):
        resinspect.run(model="helpers:plain_net", data=data, twin=True, plugins=[],
                       epochs=0, out=tmp_path / "r", device="cpu")


def test_the_twin_starts_from_the_models_initial_weights(data):
    from resinspect.models import build_model, plain_twin_of

    torch.manual_seed(5)
    model = build_model("torchvision:resnet18", 1, 10, 8)
    torch.manual_seed(5)
    twin = plain_twin_of("torchvision:resnet18", 1, 10, 8)
    params = dict(model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in twin.named_parameters())


# -- registration hooks --------------------------------------------------------------------------------
def test_a_plugin_package_can_add_a_model(tmp_path):
    from resinspect.plugins import PluginHost, PluginInfo

    class Adds:
        @resinspect.hookimpl
        def resinspect_register_models(self, registry):
            registry.add("adder-net", lambda in_channels=1, num_classes=10: UserResNet(in_channels, num_classes),
                         "a user network from a plugin")

        @resinspect.hookimpl
        def resinspect_register_datasets(self, registry):
            registry.add("tiny-digits", lambda: tiny_data(train=32, test=16), "32 digits")

    host = PluginHost()
    host.add(PluginInfo("adder", Adds(), "test"))
    result = resinspect.run(model="adder-net", data="tiny-digits", plugins=[], epochs=1, out=tmp_path / "r",
                            device="cpu", host=host)
    assert result.results.model["name"] == "adder-net" and result.results.data["train_size"] == 32
    from resinspect.models import MODELS
    assert MODELS["adder-net"].source == "plugin adder"
    clash = PluginHost(available={"clash": PluginInfo("clash", type("C", (), {
        "resinspect_register_models": staticmethod(resinspect.hookimpl(
            lambda registry: registry.add("resnet20", UserResNet, "no")))})(), "test")})
    clash.register_extensions()
    assert "already registered by resinspect" in clash.available["clash"].load_error


# -- report --------------------------------------------------------------------------------------------
def test_long_tables_fold_and_keep_a_sticky_header(data, tmp_path):
    resinspect.run(model="resnet56", data=data, plugins=["summary"], epochs=0, out=tmp_path / "r", device="cpu")
    html = (tmp_path / "r" / "index.html").read_text()
    assert '<details class="folded-table"><summary>Layers (torchinfo' in html
    assert "position: sticky" in html


# -- scaffold ------------------------------------------------------------------------------------------
def test_new_plugin_prints_an_installable_path_and_warns_about_taken_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["new-plugin", "ablation"])
    assert result.exit_code == 0
    assert "a plugin named 'ablation' is already installed" in result.output
    assert "pip install ./resinspect-ablation " in result.output


# -- progress ------------------------------------------------------------------------------------------
def test_progress_bars_only_when_the_run_shows_progress(data, capsys):
    ctx = make_context(data=data, plugin="ablation")
    items = [1, 2, 3]
    assert ctx.progress(items, desc="lesions") is items  # --quiet, or stderr not a terminal: no bar at all
    ctx.show_progress = True
    bar = ctx.progress(items, desc="lesions")
    assert list(bar) == items and bar.desc.startswith("ablation: lesions")
    captured = capsys.readouterr()
    assert "ablation: lesions" in captured.err and captured.out == ""  # stderr only


def test_a_run_that_crashes_says_failed_not_running(tmp_path, data):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            raise RuntimeError("the model's forward is broken")

    with pytest.raises(RuntimeError, match="forward is broken"):
        resinspect.run(model=Broken(), data=data, plugins=[], epochs=1, out=tmp_path / "r", device="cpu")
    stored = json.loads((tmp_path / "r" / "results.json").read_text())
    assert stored["status"] == "failed" and stored["run"]["phase"] == "train"
    assert stored["error"] == "RuntimeError: the model's forward is broken"
    assert gc.get_freeze_count() == 0  # the heap frozen during the run is given back, also after a crash


def test_the_heap_is_frozen_only_while_a_run_trains_and_analyses(tmp_path, data):
    seen = []

    class Spy:
        @resinspect.hookimpl
        def resinspect_analyze(self, ctx):
            seen.append(gc.get_freeze_count())

    host = PluginHost(available={})
    host.add(PluginInfo("spy", Spy(), "test"))
    resinspect.run(data=data, plugins=["spy"], epochs=0, out=tmp_path / "r", device="cpu", host=host)
    assert seen and seen[0] > 10_000 and gc.get_freeze_count() == 0


def test_a_run_with_progress_shows_each_long_phase_on_stderr_and_never_in_the_report(tmp_path, data, capsys):
    result = resinspect.run(data=data, plugins=["ablation", "activations", "attribution"], epochs=1, twin=True,
                            out=tmp_path / "r", device="cpu", progress=True,
                            options={"ablation": {"k_max": 1, "subsets": 1},
                                     "attribution": {"images": 4, "ig_steps": 2, "sanity_images": 2}})
    err = capsys.readouterr().err
    for phase in ("train model", "train twin", "[resinspect] analysing: ablation", "ablation: lesion sweep",
                  "ablation: lesions with BN re-estimated", "ablation: plain twin sweep",
                  "activations: activation statistics", "attribution: attribution maps",
                  "attribution: deletion/insertion scoring", "attribution: cascading randomisation"):
        assert phase in err, phase
    html = (result.run_dir / "index.html").read_text()
    assert "it/s" not in html and "analysing:" not in html
