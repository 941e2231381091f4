"""The contract every installed plugin passes (built-ins, the example package, anything else installed).

For each plugin and model (resnet20, plain20, torchvision resnet18) on a tiny dataset: the run gives the
same results twice with the same seed, leaves no hooks and the networks in eval mode, writes TensorBoard
tags only under its own name, returns a section with an explanation, and fails cleanly when it raises.
"""

import json

import pytest

import resinspect
from resinspect.plugins import PluginHost, discover_entry_points
from resinspect.testing import hook_count, overridden_forwards, tiny_data

INSTALLED = sorted(name for name, info in discover_entry_points().items() if info.load_error is None)
MODELS = ["resnet20", "plain20", "torchvision:resnet18"]
# smaller workloads for the expensive analyses; the contract is about behaviour, not statistics
FAST = {
    "ablation": {"k_max": 2, "subsets": 2, "bn_batches": 1},
    "attribution": {"images": 6, "ig_steps": 4, "smoothgrad_samples": 2, "sanity_images": 3,
                    "methods": ["saliency", "integrated_gradients", "occlusion", "gradcam"]},
    "activations": {"samples": 32},
}


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=64, test=32)


def _run(plugin, model, data, out, twin=False):
    return resinspect.run(model=model, data=data, plugins=[plugin], epochs=1, twin=twin, device="cpu", seed=3,
                          out=out, options={plugin: FAST[plugin]} if plugin in FAST else None, batch_size=32)


def _comparable(result):
    stored = json.loads((result.run_dir / "results.json").read_text())
    plugin = next(iter(stored["plugins"].values()))
    return [{k: s[k] for k in ("title", "findings", "metrics", "tables")} for s in plugin["sections"]]


def test_the_builtins_are_installed():
    assert {"summary", "activations", "gradflow", "weights", "ablation", "attribution"} <= set(INSTALLED)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_contract(plugin, model, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _run(plugin, model, data, tmp_path / "a")
    assert first.status == "complete", first.results["plugins"][plugin]["traceback"]
    sections = first.sections[plugin]
    assert sections and all(s.explanation.strip() for s in sections)
    for net in (first.model,):
        assert hook_count(net) == 0 and overridden_forwards(net) == []
        assert not net.training
    second = _run(plugin, model, data, tmp_path / "b")
    assert _comparable(first) == _comparable(second)
    acc = EventAccumulator(str(tmp_path / "a" / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = {t for kind in ("scalars", "images", "histograms", "tensors") for t in acc.Tags().get(kind, [])}
    assert tags and all(t.split("/")[0] in (plugin, "train") for t in tags), sorted(tags)[:10]


@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_with_twin_leaves_both_networks_clean(plugin, data, tmp_path):
    result = _run(plugin, "resnet20", data, tmp_path, twin=True)
    assert result.status == "complete", result.results["plugins"][plugin]["traceback"]
    for net in (result.model, result.twin):
        assert hook_count(net) == 0 and overridden_forwards(net) == [] and not net.training


@pytest.mark.parametrize("plugin", INSTALLED)
def test_plugin_fails_cleanly(plugin, data, tmp_path):
    host = PluginHost()
    module = host.available[plugin].plugin

    def boom(ctx):
        raise RuntimeError(f"{plugin} forced failure")

    original = getattr(module, "resinspect_analyze")
    setattr(module, "resinspect_analyze", resinspect.hookimpl(boom))
    try:
        result = resinspect.run(model="resnet20", data=data, plugins=[plugin, "summary" if plugin != "summary"
                                                                      else "weights"], epochs=1, device="cpu",
                                out=tmp_path, host=host, options={plugin: FAST[plugin]} if plugin in FAST else None)
    finally:
        setattr(module, "resinspect_analyze", original)
    assert result.status == "plugins_failed" and result.exit_code == 1
    assert result.results["plugins"][plugin]["status"] == "failed"
    assert f"{plugin} forced failure" in result.results["plugins"][plugin]["error"]
    other = next(n for n in result.results["plugins"] if n != plugin)
    assert result.results["plugins"][other]["status"] == "ok"
    assert hook_count(result.model) == 0 and overridden_forwards(result.model) == []
