import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resinspect.data import load_data
from resinspect.testing import hook_count, make_context, overridden_forwards, run_plugin
from resinspect_plugins import attribution
from resinspect_plugins._attribution_methods import METHODS, attribute
from resinspect_plugins._attribution_scores import (deletion_insertion, mask_share, pixel_ranks, pointing_game,
                                                    spearman)

OPTS = {"ig_steps": 16, "internal_batch_size": 64, "smoothgrad_samples": 4, "smoothgrad_std": 0.1,
        "occlusion_window": 4}


@pytest.fixture(scope="module")
def shapes():
    return load_data("shapes", size=16, train_count=200, test_count=48)


def test_maps_equal_captums(shapes):
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    ctx = make_context("resnet20", data=shapes)
    x = next(ctx.test_batches(6))[0]
    t = ctx.model(x).argmax(1)
    ig = IntegratedGradients(ctx.model).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=16,
                                                  internal_batch_size=64)
    assert torch.allclose(attribute(ctx.model, "integrated_gradients", x, t, OPTS), ig.sum(1), atol=1e-6)
    sal = Saliency(ctx.model).attribute(x, target=t, abs=True)
    assert torch.allclose(attribute(ctx.model, "saliency", x, t, OPTS), sal.sum(1), atol=1e-7)
    occ = Occlusion(ctx.model).attribute(x, sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=0.0,
                                         target=t)
    assert torch.allclose(attribute(ctx.model, "occlusion", x, t, OPTS), occ.sum(1), atol=1e-5)
    assert hook_count(ctx.model) == 0


class RegionModel(nn.Module):
    """Class 0's logit is 5 × the mean of the top-left 4×4 region; class 1's is constant 0."""

    def forward(self, x):
        s = x[:, :, :4, :4].mean((1, 2, 3)) * 5
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_oracle_map_beats_a_random_map_on_deletion():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8) + 0.5
    target = torch.zeros(8, dtype=torch.long)
    oracle = torch.zeros(8, 8, 8)
    oracle[:, :4, :4] = 1.0
    random_map = torch.rand(8, 8, 8)
    model = RegionModel()
    d_curve, i_curve, d_oracle, i_oracle = deletion_insertion(model, x, target, oracle, steps=16)
    _, _, d_random, i_random = deletion_insertion(model, x, target, random_map, steps=16)
    assert (d_oracle < d_random).all() and (i_oracle > i_random).all()
    # the oracle removes the whole region in the first quarter of the curve: p(class 0) falls to 0.5 by then
    assert d_curve[:, 4] == pytest.approx(torch.full((8,), 0.5), abs=1e-6)
    assert d_curve[:, 0] == pytest.approx(torch.softmax(model(x), 1)[:, 0], abs=1e-6)
    assert i_curve[:, -1] == pytest.approx(d_curve[:, 0], abs=1e-6)


def test_pointing_game_and_mask_share():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(400, 10, 10, dtype=torch.bool)
    masks[:, 2:6, 3:8] = True  # 20% of the image
    assert pointing_game(masks.float(), masks).mean() == 1.0
    assert mask_share(masks.float(), masks).mean() == 1.0
    random_maps = torch.rand(400, 10, 10, generator=g)
    assert pointing_game(random_maps, masks).mean().item() == pytest.approx(0.2, abs=0.06)
    assert mask_share(random_maps, masks).mean().item() == pytest.approx(0.2, abs=0.02)


def test_spearman_and_ranks():
    a = torch.tensor([[[3.0, 1.0], [2.0, 0.0]]])
    assert pixel_ranks(a).tolist() == [[[0, 2], [1, 3]]]
    assert spearman(a, a).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, a * 7 + 1).item() == pytest.approx(1.0)


def _edges(model, x, target, opts, stage=None):
    """A deliberately model-independent 'attribution': the input's edge magnitude (Sobel)."""
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device)
    gray = x.detach().mean(1, keepdim=True)
    gx = F.conv2d(gray, k.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(gray, k.t().reshape(1, 1, 3, 3), padding=1)
    return (gx ** 2 + gy ** 2).sqrt()[:, 0]


def test_sanity_check_flags_a_model_independent_method(shapes, monkeypatch, tmp_path):
    monkeypatch.setitem(METHODS, "edges", _edges)
    ctx = make_context("resnet20", data=shapes)
    opts = {**OPTS, "methods": ["edges", "integrated_gradients"], "images": 12, "curve_steps": 8, "sanity": True,
            "sanity_images": 6, "sanity_threshold": 0.5}
    ctx.plugin_options = {"attribution": opts}
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    section = attribution.resinspect_analyze(ctx=ctx)
    assert section.metrics["edges/sanity_final_spearman"] == pytest.approx(1.0)
    assert section.metrics["integrated_gradients/sanity_final_spearman"] < 0.5
    failed = [f.text for f in section.findings if f.text.startswith("Fails the sanity check")]
    assert failed and "edges" in failed[0] and "integrated_gradients" not in failed[0]
    assert all(torch.equal(v, before[k]) for k, v in ctx.model.state_dict().items())  # the model itself untouched


@pytest.mark.parametrize("model", ["resnet20", "torchvision:resnet18"])
def test_runs_end_to_end(model, shapes, tmp_path):
    section = run_plugin("attribution", model=model, data=shapes, epochs=1, out=tmp_path,
                         options={"attribution": {"images": 8, "ig_steps": 8, "smoothgrad_samples": 4, "sanity_images": 4,
                                  "methods": ["saliency", "integrated_gradients", "gradcam"]}})
    n_stages = 3 if model == "resnet20" else 4
    faith = section.tables[0]
    assert len(faith.rows) == 2 + n_stages + 1  # methods, gradcam per stage, random baseline
    assert "pointing game ↑" in faith.columns
    assert section.metrics["random (baseline)/pointing_game"] <= 1
    assert len(section.figures) == 2 + n_stages + 1  # one grid per method + the sanity curve
    net = section.run_result.model
    assert hook_count(net) == 0 and overridden_forwards(net) == []


def test_bad_method_name_is_rejected_before_work(tmp_path):
    import resinspect
    from resinspect.errors import OptionError

    with pytest.raises(OptionError, match="'gradcamm' is not one of"):
        resinspect.run(plugins=["attribution"], options=["attribution.methods=saliency,gradcamm"],
                       out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
