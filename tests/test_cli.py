import json

import click
import pytest
from click.testing import CliRunner

from resinspect.cli import main

FAST = ["--data-arg", "size=8", "--epochs", "1", "--device", "cpu", "-q"]


@pytest.fixture
def cli():
    return CliRunner()


def test_every_command_has_help_text(cli):
    assert main.help
    for name, cmd in main.commands.items():
        assert cmd.help, f"command {name} has no help text"
        result = cli.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{name} {param.name} has no help"
            elif isinstance(param, click.Argument):
                # click arguments take no help text in every click version: the docstring describes them
                assert param.human_readable_name in cmd.help, f"{name}: argument {param.name} not in its help"


@pytest.mark.parametrize("args,bad,closest", [
    (["run", "--model", "resnet21"], "resnet21", "resnet20"),
    (["run", "--data", "digit"], "digit", "digits"),
    (["run", "--plugins", "ablaton"], "ablaton", "ablation"),
    (["run", "--plugins", "summary", "-o", "summary.dept=2"], "dept", "depth"),
])
def test_bad_names_fail_at_once_with_valid_names_and_closest(cli, tmp_path, args, bad, closest):
    result = cli.invoke(main, args + ["--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1, result.output
    assert f"unknown" in result.output and f"'{bad}'" in result.output
    assert f"did you mean '{closest}'" in result.output
    assert not (tmp_path / "r").exists()


def test_bad_option_value(cli, tmp_path):
    result = cli.invoke(main, ["run", "--plugins", "ablation", "-o", "ablation.samples=lots",
                               "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and "ablation.samples: 'lots' is not a valid int" in result.output


def test_models_and_datasets_list_the_valid_names(cli):
    models = cli.invoke(main, ["models"]).output
    for name in ("resnet20", "plain110", "seed34", "torchvision:resnet50", "hf:<folder or hub id>",
                 "package.module:function"):
        assert name in models
    datasets = cli.invoke(main, ["datasets"]).output
    for name in ("digits", "shapes", "mnist", "fashionmnist", "cifar10", "imagefolder"):
        assert name in datasets


def test_plugins_lists_versions_descriptions_and_options(cli):
    out = cli.invoke(main, ["plugins"]).output
    assert "ablation 0.1.0" in out and "-o ablation.samples=" in out and "Lesion study" in out
    listed = json.loads(cli.invoke(main, ["plugins", "--json"]).output)
    assert {"summary", "ablation"} <= {p["name"] for p in listed}


def test_run_then_train_from_checkpoint_and_report(cli, tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(main, ["run", "--plugins", "summary", "--out", str(out)] + FAST)
    assert result.exit_code == 0, result.output
    assert "run complete" in result.output and (out / "index.html").is_file()
    # config.toml is enough to rerun
    again = cli.invoke(main, ["run", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "-q"])
    assert again.exit_code == 0, again.output
    first = json.loads((out / "results.json").read_text())
    second = json.loads((tmp_path / "again" / "results.json").read_text())
    assert first["training"]["model"]["step_losses"] == second["training"]["model"]["step_losses"]
    # load the checkpoint instead of training
    loaded = cli.invoke(main, ["run", "--checkpoint", str(out / "model.pt"), "--plugins", "summary",
                               "--data-arg", "size=8", "--out", str(tmp_path / "loaded"), "-q"])
    assert loaded.exit_code == 0, loaded.output
    res = json.loads((tmp_path / "loaded" / "results.json").read_text())
    assert res["training"] == {} and res["model"]["checkpoint"] == str(out / "model.pt")
    # re-render
    (out / "index.html").unlink()
    rendered = cli.invoke(main, ["report", str(out)])
    assert rendered.exit_code == 0 and (out / "index.html").is_file()


def test_checkpoint_errors_reach_the_user(cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00\x01garbage")
    result = cli.invoke(main, ["run", "--checkpoint", str(bad), "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1 and f"checkpoint {bad}: unreadable" in result.output


def test_train_command_writes_a_checkpoint(cli, tmp_path):
    result = cli.invoke(main, ["train", "--out", str(tmp_path / "t")] + FAST)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and (tmp_path / "t" / "model.pt").is_file()


def test_failed_plugin_gives_nonzero_exit(cli, tmp_path):
    plugin = tmp_path / "boom.py"
    plugin.write_text("from resinspect import hookimpl\n@hookimpl\ndef resinspect_analyze(ctx):\n"
                      "    raise RuntimeError('boom')\n")
    result = cli.invoke(main, ["run", "--plugins", f"summary,{plugin}", "--out", str(tmp_path / "r")] + FAST)
    assert result.exit_code == 1
    assert "[failed] boom: RuntimeError: boom" in result.output
    assert "run plugins_failed" in result.output


def test_report_of_a_non_run_dir(cli, tmp_path):
    result = cli.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "results.json: no such file" in result.output


def test_default_run_uses_resnet20_on_digits_and_every_default_plugin(cli, tmp_path, monkeypatch):
    """The README's first command: no arguments (here only -q, and run inside a temporary folder)."""
    from resinspect.plugins import DEFAULT_PLUGINS

    monkeypatch.chdir(tmp_path)
    result = cli.invoke(main, ["run", "-q"])
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "reports").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-resnet20-digits")
    stored = json.loads((runs[0] / "results.json").read_text())
    assert stored["status"] == "complete" and stored["config"]["epochs"] == 8
    assert list(stored["plugins"]) == list(DEFAULT_PLUGINS)
    assert stored["training"]["model"]["epochs"][-1]["test_accuracy"] > 0.9
    assert stored["run"]["seconds"] < 180


def test_train_seed34_on_local_mnist_files(cli, tmp_path):
    from test_data import _idx
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(16) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (8, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(8) % 10)
    result = cli.invoke(main, ["train", "--model", "seed34", "--data", "mnist", "--data-root", str(tmp_path),
                               "--epochs", "1", "--batch-size", "8", "-q", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    import torch
    payload = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert payload["arch"] == "seed34" and payload["arch_kwargs"]["image_size"] == 28


def test_checkpoint_for_another_dataset_is_refused(cli, tmp_path):
    out = tmp_path / "digits"
    assert cli.invoke(main, ["train", "--out", str(out)] + FAST).exit_code == 0
    result = cli.invoke(main, ["run", "--checkpoint", str(out / "model.pt"), "--data", "shapes", "--data-arg",
                               "size=16", "--plugins", "summary", "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 1
    assert f"checkpoint {out / 'model.pt'}: the model was built for 1 input channel(s) and 10 classes" in result.output
    assert "dataset 'shapes' has 3 channel(s) and 5 classes" in result.output


def _settings_size8():
    from resinspect.runner import RunSettings
    return RunSettings(data_args={"size": 8})


def test_twin_with_checkpoint_loads_the_saved_twin(cli, tmp_path):
    first = tmp_path / "first"
    assert cli.invoke(main, ["train", "--twin", "--out", str(first)] + FAST).exit_code == 0
    result = cli.invoke(main, ["run", "--checkpoint", str(first / "model.pt"), "--twin", "--plugins", "summary",
                               "--data-arg", "size=8", "--out", str(tmp_path / "again"), "-q"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "again" / "results.json").read_text())
    assert stored["model"]["twin"]["name"] == "plain20"
    import torch

    import resinspect
    from resinspect.models import load_checkpoint
    saved_twin, _ = load_checkpoint(first / "twin.pt")
    api = resinspect.run(checkpoint=first / "model.pt", twin=True, plugins=[], device="cpu",
                         out=tmp_path / "api", settings=_settings_size8())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(saved_twin.state_dict().values(),
                                                       api.twin.state_dict().values()))
    lonely = tmp_path / "lonely"
    assert cli.invoke(main, ["train", "--out", str(lonely)] + FAST).exit_code == 0
    refused = cli.invoke(main, ["run", "--checkpoint", str(lonely / "model.pt"), "--twin", "--data-arg", "size=8",
                                "--out", str(tmp_path / "r"), "-q"])
    assert refused.exit_code == 1 and f"no trained twin at {lonely / 'twin.pt'}" in refused.output


def test_epochs_given_with_a_checkpoint_are_trained(cli, tmp_path):
    first = tmp_path / "first"
    assert cli.invoke(main, ["train", "--out", str(first)] + FAST).exit_code == 0
    result = cli.invoke(main, ["run", "--checkpoint", str(first / "model.pt"), "--epochs", "2", "--plugins", "summary",
                               "--data-arg", "size=8", "--out", str(tmp_path / "more"), "-q"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "more" / "results.json").read_text())
    assert stored["config"]["epochs"] == 2 and len(stored["training"]["model"]["epochs"]) == 2
