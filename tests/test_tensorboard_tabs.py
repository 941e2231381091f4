"""TensorBoard as a front end: every tab a run writes, read back with TensorBoard's own loaders and checked
against numbers computed here by hand (HParams, graph, projector, PR curves, custom scalars, text)."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import resinspect
from resinspect.tbtabs import PR_THRESHOLDS, fx_graph_def, pr_tags
from resinspect.testing import tiny_data

TEST_IMAGES, SAMPLES, EMBEDDED = 64, 48, 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabs") / "run"
    data = tiny_data(train=128, test=TEST_IMAGES)
    result = resinspect.run(model="resnet8", data=data, plugins=["summary", "ablation"], epochs=1, twin=True,
                            out=out, device="cpu", tb_samples=SAMPLES, tb_embeddings=EMBEDDED,
                            options={"ablation": {"k_max": 2, "subsets": 2}})
    assert result.status == "complete"
    return out, result, data


def _acc(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _tensor(acc, tag):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(acc.Tensors(tag)[0].tensor_proto)


def _test_set(data, n):
    x, y = data.test.tensors
    return x[:n], y[:n]


def test_the_record_says_what_was_written_with_its_cost_and_what_was_subsampled(run):
    out, result, _ = run
    record = json.loads((out / "results.json").read_text())["tensorboard"]
    assert set(record["written"]) == {"hparams", "graph", "projector", "pr", "layout", "text"}
    assert record["skipped"] == {}
    assert all(w["seconds"] >= 0 for w in record["written"].values())
    assert not any("not written" in n for n in record["notes"]), record["notes"]
    subsampled = f"pr, projector: the first {SAMPLES} of {TEST_IMAGES} test images (--tb-samples {SAMPLES})"
    assert subsampled in record["notes"]
    # the report's run details say it too
    assert "TensorBoard" in (out / "index.html").read_text() and "hparams" in (out / "index.html").read_text()


def test_hparams_one_session_per_network_with_settings_and_final_numbers(run):
    from tensorboard.plugins.hparams import metadata

    out, result, _ = run
    results = json.loads((out / "results.json").read_text())
    for role, name, residual in (("model", "resnet8", True), ("twin", "plain8", False)):
        acc = _acc(out / "tb" / role)
        content = acc.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        hp = {k: v for k, v in start.hparams.items()}
        assert hp["model"].string_value == name and hp["residual"].bool_value is residual
        assert hp["depth"].number_value == 8 and hp["seed"].number_value == 0 and hp["epochs"].number_value == 1
        assert hp["optimizer"].string_value == "adam" and hp["lr"].number_value == pytest.approx(1e-3)
        assert hp["plugins"].string_value == "summary,ablation" and hp["twin"].string_value == "plain"
        exp = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        assert [h.name for h in exp.hparam_infos][:3] == ["depth", "model", "residual"]
        metrics = [m.name.tag for m in exp.metric_infos]
        assert metrics[:3] == ["hparams/test_error", "hparams/train_error", "hparams/test_accuracy"]
        assert "hparams/ablation/median_lesion_cost_points" in metrics  # a plugin's key metric
        final = results["training"][role]["epochs"][-1]
        assert acc.Scalars("hparams/test_error")[0].value == pytest.approx(1 - final["test_accuracy"])
        assert acc.Scalars("hparams/train_error")[0].value == pytest.approx(1 - final["train_accuracy"])
    key = results["plugins"]["ablation"]["sections"][0]["metrics"]["median_lesion_cost_points"]
    assert _acc(out / "tb" / "model").Scalars("hparams/ablation/median_lesion_cost_points")[0].value == \
        pytest.approx(key)


def test_graph_has_a_scope_per_module_and_a_node_per_residual_addition(run):
    out, result, _ = run
    blocks = [b["name"] for b in json.loads((out / "results.json").read_text())["model"]["residual_blocks"]]
    assert blocks == ["layer1.0", "layer2.0", "layer3.0"]
    graph = {n.name: n for n in _acc(out / "tb" / "model").Graph().node}
    adds = sorted(n for n, node in graph.items() if node.op == "ResidualAdd")
    assert adds == [f"{b.replace('.', '/')}/residual_add" for b in blocks]
    # layer1.0's identity shortcut carries the stem's output around the branch: the add reads both
    assert list(graph["layer1/0/residual_add"].input) == ["layer1/0/bn2", "layer1/0/shortcut"]
    assert list(graph["layer1/0/shortcut"].input) == ["stem/2"] and list(graph["layer1/0/conv1"].input) == ["stem/2"]
    assert list(graph["layer2/0/shortcut/0"].input) == ["layer1/0/relu_1"]  # the projection shortcut
    shape = graph["layer2/0/residual_add"].attr["_output_shapes"].list.shape[0]
    assert [d.size for d in shape.dim] == [1, 32, 4, 4]
    # the twin: the same layers, no addition
    twin = {n.name: n for n in _acc(out / "tb" / "twin").Graph().node}
    assert not any(n.op == "ResidualAdd" or n.op == "add" for n in twin.values())
    assert {"layer1/0/conv1", "layer3/0/bn2", "fc"} <= set(twin)


class BranchyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

    def forward(self, x):
        if x.mean() > 100:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return x + self.f(x)


def test_graph_keeps_an_untraceable_module_whole_and_notes_a_model_that_cannot_be_traced(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BranchyBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    blocks = resinspect.residual_blocks(model)
    gd = fx_graph_def(model, torch.randn(1, 1, 8, 8), blocks, {u[0] for u in blocks.untraced})
    assert [n.name for n in gd.node] == ["input", "0", "1", "2", "3", "4", "output"]
    assert [n.op for n in gd.node][1:6] == ["Conv2d", "BranchyBlock", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    # a model whose own forward branches on data: no graph, one line saying why, the rest written
    result = resinspect.run(model=BranchyBlock2Net(), data=tiny_data(train=64, test=32), plugins=["summary"],
                            epochs=0, out=tmp_path / "r", device="cpu", tb_embeddings=0)
    record = result.results.tensorboard
    note = next(n for n in record["notes"] if n.startswith("graph:"))
    assert "could not be traced by torch.fx" in note and "TraceError" in note
    assert "hparams" in record["written"] and "pr" in record["written"]
    assert record["written"]["projector"]["what"] == "off (tb_embeddings = 0)"
    assert not _acc(tmp_path / "r" / "tb" / "model").Tags()["graph"]


class BranchyBlock2Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.head(self.f(x))


def test_projector_holds_the_head_inputs_of_the_first_images_with_labels_and_thumbnails(run):
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    out, result, data = run
    x, y = _test_set(data, EMBEDDED)
    for role, net in (("model", result.model), ("twin", result.twin)):
        folder = out / "tb" / role
        config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), ProjectorConfig())
        (emb,) = config.embeddings
        features: list = []
        handle = net.fc.register_forward_pre_hook(lambda m, a, out=features: out.append(a[0]))
        with torch.no_grad():
            net.eval()(x)
        handle.remove()
        logged = np.loadtxt(folder / emb.tensor_path, delimiter="\t")
        assert logged.shape == (EMBEDDED, 64)
        np.testing.assert_allclose(logged, features[0].numpy(), rtol=1e-4, atol=1e-5)
        labels = (folder / emb.metadata_path).read_text().split("\n")[:EMBEDDED]
        assert labels == [data.class_names[int(v)] for v in y]
        sprite = Image.open(folder / emb.sprite.image_path)
        assert list(emb.sprite.single_image_dim) == [8, 8] and sprite.size == (5 * 8, 5 * 8)  # ceil(sqrt(20)) = 5


def test_pr_curves_per_class_agree_with_counts_by_hand(run):
    out, result, data = run
    x, y = _test_set(data, SAMPLES)
    tags = pr_tags(data.class_names, 10)
    assert tags[3] == "pr/3"
    for role, net in (("model", result.model), ("twin", result.twin)):
        acc = _acc(out / "tb" / role)
        with torch.no_grad():
            probs = torch.softmax(net.eval()(x), 1).numpy()
        for c in (0, 3, 7):
            curve = _tensor(acc, tags[c])  # rows: TP, FP, TN, FN, precision, recall; a column per threshold
            assert curve.shape == (6, PR_THRESHOLDS)
            positive = (y.numpy() == c)
            for i in (0, 40, 100):
                above = np.floor(probs[:, c] * (PR_THRESHOLDS - 1)) >= i  # TensorBoard's own bucketing
                assert curve[0, i] == (above & positive).sum() and curve[1, i] == (above & ~positive).sum()
            assert curve[0, 0] + curve[3, 0] == positive.sum()  # TP + FN at threshold 0: every positive


def test_custom_scalars_layout_has_model_and_twin_on_one_chart_and_no_empty_chart(run):
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import metadata as cs

    out, result, _ = run
    model, twin = _acc(out / "tb" / "model"), _acc(out / "tb" / "twin")
    layout = layout_pb2.Layout()
    layout.ParseFromString(_tensor(model, cs.CONFIG_SUMMARY_TAG).item())
    charts = {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    assert charts[("model vs twin: training", "test accuracy per epoch")] == ["^train/test_accuracy$"]
    assert ("model vs twin: final numbers", "test_error") in charts
    assert ("ablation", "lesion_cost_points (x = block index)") in charts
    tags = {role: set(acc.Tags()["scalars"]) for role, acc in (("model", model), ("twin", twin))}
    for key, regexes in charts.items():
        matched = {role for role, ts in tags.items() for t in ts if any(re.match(r, t) for r in regexes)}
        assert matched, f"empty chart {key}"
    # the training charts draw both networks
    assert tags["model"] >= {"train/test_accuracy", "train/loss"} <= tags["twin"]
    # a dossier column as a profile over depth: step = block index
    block = json.loads((out / "results.json").read_text())["plugins"]["ablation"]["sections"][0]
    costs = [e.value for e in model.Scalars("ablation/by_block/lesion_cost_points")]
    assert [e.step for e in model.Scalars("ablation/by_block/lesion_cost_points")] == [0, 1, 2]
    assert costs == pytest.approx([block["per_block"]["lesion cost (points)"][b]
                                   for b in ("layer1.0", "layer2.0", "layer3.0")])


def test_text_holds_the_config_and_each_explanation(run):
    out, result, _ = run
    model = _acc(out / "tb" / "model")
    config = _tensor(model, "run/config/text_summary").item().decode()
    assert "[run]" in config and 'model = "resnet8"' in config
    explanation = _tensor(model, "ablation/explanation/text_summary").item().decode()
    assert result.section("ablation").explanation.split("\n")[0] in explanation
    assert "findings" in " ".join(model.Tags()["tensors"])  # findings were already there


def test_each_kind_can_be_skipped_and_a_bad_kind_is_refused(tmp_path):
    result = resinspect.run(model="resnet8", data=tiny_data(train=64, test=32), plugins=["summary"], epochs=0,
                            out=tmp_path / "r", device="cpu", tb_skip=["graph", "projector", "pr"])
    record = result.results.tensorboard
    assert record["skipped"] == {"graph": "--tb-skip", "projector": "--tb-skip", "pr": "--tb-skip"}
    assert set(record["written"]) == {"hparams", "layout", "text"}
    assert not (tmp_path / "r" / "tb" / "model" / "projector_config.pbtxt").exists()
    acc = _acc(tmp_path / "r" / "tb" / "model")
    assert not acc.Tags()["graph"] and not any(t.startswith("pr/") for t in acc.Tags()["tensors"])
    # untrained: the test error comes from the evaluation pass, and says so
    assert any("not trained in this run" in n for n in record["notes"])
    assert math.isfinite(acc.Scalars("hparams/test_error")[0].value)
    with pytest.raises(resinspect.ResinspectError, match="unknown kind.*'graphs'.*valid: hparams, graph"):
        resinspect.run(model="resnet8", data=tiny_data(train=64, test=32), plugins=["summary"], epochs=0,
                       out=tmp_path / "s", device="cpu", tb_skip=["graphs"])


def test_pr_curves_stop_at_32_classes_and_say_so(tmp_path):
    from resinspect.data import DataBundle

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 1, 8, 8, generator=g), torch.arange(80) % 40
    ds = torch.utils.data.TensorDataset(x, y)
    names = [f"n{i:08d}" for i in range(40)]
    data = DataBundle("many", ds, ds, in_channels=1, image_size=8, num_classes=40, class_names=names)
    result = resinspect.run(model="resnet8", data=data, plugins=["summary"], epochs=0, out=tmp_path / "r",
                            device="cpu", tb_skip=["graph", "projector", "layout"])
    assert "pr: curves for the first 32 of 40 classes" in result.results.tensorboard["notes"]
    tags = [t for t in _acc(tmp_path / "r" / "tb" / "model").Tags()["tensors"] if t.startswith("pr/")]
    assert sorted(tags) == sorted(f"pr/{n}" for n in names[:32])


def test_overwrite_replaces_the_old_runs_tensorboard_logs(tmp_path):
    kwargs = dict(model="resnet8", data=tiny_data(train=64, test=32), plugins=["summary"], epochs=0,
                  out=tmp_path / "r", device="cpu", tb_embeddings=8)
    resinspect.run(**kwargs)
    resinspect.run(**kwargs, overwrite=True)
    assert len(list((tmp_path / "r" / "tb" / "model").glob("events.out.tfevents.*"))) == 1
    assert (tmp_path / "r" / "tb" / "model" / "projector_config.pbtxt").read_text().count("embeddings {") == 1
