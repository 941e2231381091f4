"""The model you already have: every torchvision classifier by name, --weights from the torch hub cache or a
state-dict file (.pth, .safetensors), the weights' own preprocessing and classes. Nothing is downloaded: the
hub cache is a fake one under TORCH_HOME, the files are written here in their real formats."""

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from helpers import write_image_folder
from PIL import Image

import resinspect
from resinspect.cli import main
from resinspect.errors import CheckpointError, ResinspectError
from resinspect.models.pretrained import (
    Pretrained,
    class_mapping,
    imagenet_wnids,
    read_safetensors,
    read_state_dict,
    resolve_weights,
)

WNIDS = ["n01440764", "n01443537"]  # ImageNet classes 0 (tench) and 1 (goldfish)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An evaluation-only ImageFolder (val/ only) with wnid-named classes, 3 JPEGs each, odd sizes."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), WNIDS, 3, 40, 50, seed=0)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)  # torchvision's layout: 1000 classes
    return path


def test_every_torchvision_classifier_is_a_name_and_builds_for_the_dataset():
    from resinspect.models.registry import model_names

    names = set(model_names())
    for arch in ("convnext_tiny", "vit_b_16", "swin_t", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf",
                 "resnext50_32x4d", "maxvit_t", "swin_v2_t"):
        assert f"torchvision:{arch}" in names
    assert len([n for n in names if n.startswith("torchvision:")]) == len(torchvision.models.list_models(
        module=torchvision.models))
    out = CliRunner().invoke(main, ["models"]).output
    assert "torchvision:convnext_tiny" in out and "ConvNeXt" in out
    # without weights: adapted to the dataset's channels and classes
    for arch in ("mobilenet_v3_small", "regnet_x_400mf"):
        net = resinspect.build_model(f"torchvision:{arch}", in_channels=1, num_classes=7, image_size=32).eval()
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_a_torchvision_state_dict_file_keeps_the_head_classes_and_preprocessing(folder, resnet18_file, tmp_path):
    result = resinspect.run(model="torchvision:resnet18", data="imagefolder", data_root=str(folder),
                            weights=str(resnet18_file), plugins=["summary"], out=tmp_path / "r", device="cpu",
                            tb_skip=["graph", "projector", "layout"])
    assert result.status == "complete", result.results.error
    saved = torch.load(resnet18_file, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in result.model.state_dict().items())  # loaded exactly
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["config"]["epochs"] == 0 and data["model"]["trained"] is True
    assert data["data"]["num_classes"] == 1000 and data["data"]["image_size"] == 224
    assert "ImageNet ids" in data["data"]["classes"] and "ImageClassification" in data["data"]["preprocessing"]
    assert data["data"]["evaluation_only"] is True
    # the weights' own transform (resize 256, centre crop 224, ImageNet mean/std), labels mapped to 0 and 1
    tf = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    xs, ys = zip(*_test_items(result))
    by_hand = torch.stack([tf(Image.open(folder / "val" / w / f"{i}.jpg").convert("RGB")) for w in WNIDS
                           for i in range(3)])
    assert torch.allclose(torch.stack(xs), by_hand) and list(ys) == [0, 0, 0, 1, 1, 1]
    # evaluation is over the mapped classes: the hparams test error equals the accuracy computed here
    with torch.no_grad():
        acc = (result.model.eval()(by_hand).argmax(1) == torch.tensor(ys)).float().mean().item()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "r" / "tb" / "model"))
    tb.Reload()
    assert tb.Scalars("hparams/test_error")[0].value == pytest.approx(1 - acc)


def _test_items(result):
    """The run's test set as the analyses saw it (the relabelled bundle kept by ``_capture_bundle``)."""
    return [(x, int(y)) for x, y in _LAST_BUNDLE["test"]]


_LAST_BUNDLE: dict = {}


@pytest.fixture(autouse=True)
def _capture_bundle(monkeypatch):
    """Keep the relabelled bundle of the last run, to read its test set as the analyses did."""
    from resinspect import runner
    from resinspect.models import pretrained

    original = pretrained.pretrained_bundle

    def keep(bundle, pre, expected=None):
        out = original(bundle, pre, expected)
        _LAST_BUNDLE["test"] = out.test
        return out

    monkeypatch.setattr(runner, "pretrained_bundle", keep)


def test_a_weights_name_resolves_offline_from_the_hub_cache(monkeypatch, tmp_path, resnet18_file):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ResinspectError) as e:
        resolve_weights("torchvision:resnet18", "DEFAULT")
    assert f"expected {expected}" in str(e.value) and weights.url in str(e.value)
    expected.parent.mkdir(parents=True)
    expected.write_bytes(resnet18_file.read_bytes())  # the file torchvision would have cached
    pre = resolve_weights("torchvision:resnet18", "DEFAULT")
    assert pre.num_classes == 1000 and pre.categories[:2] == ["tench", "goldfish"]
    assert pre.transform.crop_size == [224] and str(expected) in pre.source
    assert pre.state_dict.keys() == torch.load(resnet18_file, weights_only=True).keys()
    with pytest.raises(ResinspectError, match="IMAGENET9.*valid: IMAGENET1K_V1, DEFAULT"):
        resolve_weights("torchvision:resnet18", "IMAGENET9")
    with pytest.raises(ResinspectError, match="weights names are torchvision's"):
        resolve_weights("resnet20", "DEFAULT")


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).half(),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.randn(2, 2).bfloat16(),
               "e": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_a_safetensors_file_loads_any_registered_model_and_its_twin_keeps_the_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = resinspect.build_model("resnet8", in_channels=1, num_classes=10)
    save_file(source.state_dict(), tmp_path / "resnet8.safetensors")
    result = resinspect.run(model="resnet8", data="digits", data_args={"size": 8}, twin=True, device="cpu",
                            weights=str(tmp_path / "resnet8.safetensors"), plugins=["summary"], out=tmp_path / "r")
    assert result.status == "complete"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in result.model.state_dict().items())
    # the plain twin is the same pretrained network without its shortcuts
    assert result.results.model["twin"]["name"] == "plain:resnet8"
    assert torch.equal(result.twin.get_submodule("layer1.0.conv1").weight, source.layer1[0].conv1.weight)
    assert result.results.data["classes"] == "the dataset's 10 classes are the model's 10, in label order"


def test_class_mapping_by_wnid_by_name_or_by_order_and_says_which():
    pre = Pretrained(source="x", state_dict={}, num_classes=1000, categories=[f"c{i}" for i in range(1000)])
    assert imagenet_wnids()[0] == "n01440764" and len(imagenet_wnids()) == 1000
    assert class_mapping(["n01443537", "n15075141"], pre)[0] == [1, 999]
    assert class_mapping(["c5", "C7"], pre) == ([5, 7], "the 2 folder names are the weights' class names")
    mapping, said = class_mapping(["cat", "dog"], pre)
    assert mapping == [0, 1] and "label i is taken as the model's class i of 1000" in said
    with pytest.raises(ResinspectError, match="3 classes and the weights' head 2"):
        class_mapping(["a", "b", "c"], Pretrained(source="x", state_dict={}, num_classes=2))


def test_bad_weight_files_get_one_line_naming_the_file(tmp_path, resnet18_file, folder):
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(resnet18_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"weights {truncated}: not a readable state dict"):
        read_state_dict(truncated)
    st = tmp_path / "cut.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="not a valid .safetensors file.*truncated"):
        read_state_dict(st)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="expected a state dict.*found list"):
        read_state_dict(notdict)
    # the wrong architecture's weights: the keys that differ, named
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    r = CliRunner().invoke(main, ["run", "--model", "torchvision:resnet18", "--data", "imagefolder", "--data-root",
                                  str(folder), "--weights", str(other), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"weights {other} do not fit ResNet" in r.output and "unexpected: layer1.2.conv1.weight" in r.output
    # training on an evaluation-only folder is refused before any work
    r = CliRunner().invoke(main, ["run", "--model", "torchvision:resnet18", "--data", "imagefolder", "--data-root",
                                  str(folder), "--weights", str(resnet18_file), "--epochs", "1",
                                  "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "evaluation images only" in r.output
    # a 1-channel dataset for 3-channel weights
    with pytest.raises(ResinspectError, match="take 3-channel images; dataset digits has 1"):
        resinspect.run(model="torchvision:resnet18", data="digits", weights=str(resnet18_file),
                       plugins=["summary"], out=tmp_path / "t", device="cpu")


def test_formulas_check_convnexts_channels_last_linear_layers_instead_of_failing(tmp_path):
    from resinspect.testing import tiny_data

    result = resinspect.run(model="torchvision:convnext_tiny", data=tiny_data(train=16, test=8, size=32),
                            plugins=["formulas"], epochs=0, out=tmp_path / "r", device="cpu",
                            tb_skip=["graph", "projector", "pr", "layout"])
    assert result.status == "complete", result.results.plugins["formulas"].error
    section = result.section("formulas")
    rows = section.tables[0]["rows"] if isinstance(section.tables[0], dict) else section.tables[0].rows
    linear = [r for r in rows if r[0] == "linear"]
    # the block's MLP linears see (B, H, W, C) inputs: checked, to float64 rounding
    assert any(".block." in r[1] for r in linear), rows
    assert all(r[2] < 1e-8 for r in rows)


def test_wrapped_and_data_parallel_state_dicts_unwrap(tmp_path):
    sd = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    for i, obj in enumerate(({"state_dict": sd, "epoch": 3}, {"model": sd}, {"model_state_dict": sd},
                             {f"module.{k}": v for k, v in sd.items()})):
        torch.save(obj, tmp_path / f"{i}.pt")
        got = read_state_dict(tmp_path / f"{i}.pt")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
    resinspect.save_checkpoint(tmp_path / "r.pt", resinspect.build_model("resnet8"), "resnet8", {})
    with pytest.raises(CheckpointError, match="a resinspect checkpoint; load it with --checkpoint"):
        read_state_dict(tmp_path / "r.pt")


def test_the_samples_budget_caps_every_analysis_and_the_report_says_where(tmp_path):
    from resinspect.testing import tiny_data

    data = tiny_data(train=64, test=64)
    result = resinspect.run(model="resnet8", data=data, plugins=["ablation", "similarity"], epochs=1, samples=24,
                            out=tmp_path / "r", device="cpu", options={"ablation": {"k_max": 1, "subsets": 1}})
    ablation = result.section("ablation")
    said = [f.text for f in ablation.findings if f.text.startswith("Subsampled")]
    assert said == ["Subsampled by --samples 24: 24 of the 64 test images it asked for (64 in the set); "
                    "24 of the 64 training images it asked for (64 in the set)."]
    x, y = data.test.tensors
    with torch.no_grad():
        by_hand = (result.model.eval()(x[:24]).argmax(1) == y[:24]).float().mean().item()
    assert ablation.metrics["clean_accuracy"] == pytest.approx(by_hand)
    # similarity asked for 512 images: it got 24, and says so too
    assert any("24 of the 64 test images" in f.text for f in result.section("similarity").findings)
    assert "Subsampled by --samples" in (tmp_path / "r" / "index.html").read_text()
    # the default budget (1024) leaves digits' 397 test images alone
    assert resinspect.RunSettings().samples == 1024


def test_multiply_adds_match_the_published_counts():
    from resinspect.cost import multiply_adds

    assert multiply_adds(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224)) == pytest.approx(4.09e9, rel=0.01)
    assert multiply_adds(resinspect.build_model("resnet20", 3, 10), torch.randn(1, 3, 32, 32)) == pytest.approx(
        40.8e6, rel=0.01)  # He et al.'s CIFAR ResNet-20: 41M
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = attention

        def forward(self, x):
            return self.a(x, x, x)[0]

    # q, k, v and output projections (4 x 5 tokens x 8 x 8) plus the scores and mixing (2 x 5^2 x 8)
    assert multiply_adds(Wrap(), torch.randn(1, 5, 8)) == 4 * 5 * 8 * 8 + 2 * 25 * 8


def test_ablation_fits_its_quadratic_parts_to_the_compute_budget(tmp_path):
    from resinspect.cost import multiply_adds
    from resinspect.testing import tiny_data

    data = tiny_data(train=64, test=32)
    kwargs = dict(model="resnet8", data=data, plugins=["ablation"], epochs=0, device="cpu",
                  options={"ablation": {"k_max": 2, "subsets": 2}}, tb_skip=["graph", "projector", "pr"])
    full = resinspect.run(**kwargs, out=tmp_path / "full", compute=0).section("ablation")
    assert not any(f.text.startswith("Fitted") for f in full.findings)
    assert "k/2/mean_accuracy" in full.metrics and "lesion_bn/layer1.0/accuracy" in full.metrics
    per_pass = multiply_adds(full_model := resinspect.build_model("resnet8", 1, 10), data.test.tensors[0][:1]) * 32
    del full_model
    # room for the clean pass, the 3 single lesions and the 3 skip removals: nothing else
    tight = resinspect.run(**kwargs, out=tmp_path / "tight", compute=7 * per_pass).section("ablation")
    said = next(f.text for f in tight.findings if f.text.startswith("Fitted"))
    assert "BN re-estimation after each lesion off" in said and "random-subset study off" in said
    assert "skip removal" not in said.split(":", 1)[1].split("BN")[0]  # skip removal kept
    assert "skip_removal/layer1.0/accuracy" in tight.metrics and "k/1/mean_accuracy" not in tight.metrics
    assert tight.metrics["planned_multiply_adds"] <= 7 * per_pass
    # the single-block lesions are the same numbers either way
    assert tight.metrics["lesion/layer2.0/accuracy"] == full.metrics["lesion/layer2.0/accuracy"]


def test_superlinear_analyses_fit_the_compute_budget_and_skip_a_second_identical_pass(tmp_path):
    from resinspect.cost import multiply_adds
    from resinspect.testing import tiny_data

    data = tiny_data(train=64, test=32)
    macs = multiply_adds(resinspect.build_model("resnet8", 1, 10), data.test.tensors[0][:1])
    # room for 120 single-image passes: paths' images (6 passes each for 3 blocks: 20), shattered's points
    # (3 passes x 4 lines each: 10, raised to the floor of 16) and attribution's images (154 passes each:
    # saliency 3, integrated gradients 3·8, the curves 2·21 of each map and a random one, and 1; two do not
    # fit, so the curves get 10 steps first: 94 passes, one image fits) are cut to fit, and each says so
    result = resinspect.run(model="resnet8", data=data, plugins=["paths", "shattered", "attribution"], epochs=0,
                            device="cpu", compute=120 * macs, out=tmp_path / "r",
                            options={"shattered": {"toy": False, "points": 256},
                                     "attribution": {"images": 8, "ig_steps": 8, "smoothgrad_samples": 4,
                                                     "methods": ["saliency", "integrated_gradients"],
                                                     "sanity": False}},
                            tb_skip=["graph", "projector", "pr", "layout"])
    assert result.status == "complete"
    paths, shattered, attribution = (result.section(p) for p in ("paths", "shattered", "attribution"))
    assert any("Not decomposed at initialisation: nothing was trained" in f.text for f in paths.findings)
    assert "init/effective_low" not in paths.metrics
    said = next(f.text for f in paths.findings if f.text.startswith("Fitted"))
    assert "20 images decomposed instead of 32" in said
    assert shattered.metrics["points"] == 16 and "model/init/lag1_correlation" not in shattered.metrics
    assert any("16 points per line instead of 256" in f.text for f in shattered.findings)
    said = next(f.text for f in attribution.findings if f.text.startswith("Fitted"))
    assert "curve_steps 10 instead of 20" in said and "1 image(s) attributed instead of 8" in said


def test_attributions_internal_batch_is_bounded_by_the_models_size():
    from resinspect_plugins.attribution import INTERNAL_BATCH_MACS

    # torchvision's resnet50 at 224 px: 12 images per captum batch instead of 256; resnet20 keeps 256
    assert int(INTERNAL_BATCH_MACS // 4.09e9) == 12 and int(INTERNAL_BATCH_MACS // 40.8e6) > 256
