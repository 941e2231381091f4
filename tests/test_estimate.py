"""What the analysis will cost, said before it runs (the estimate from a timed probe pass), what each plugin
cost after (seconds, peak memory), and the caps that keep big models in budget: attribution's memory bound
and sanity-check steps, landscape's grid, curvature's products, the receptive-field probe."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import resinspect
from resinspect.estimate import probe, svd_multiply_adds
from resinspect.memory import PEAK_IS_PER_PHASE, peak_rss_mb, reset_peak
from resinspect.testing import make_context
from resinspect_plugins import activations, attribution, curvature, landscape, similarity
from resinspect_plugins._attribution_methods import attribute
from resinspect_plugins.attribution import checkpoints
from resinspect_plugins.summary import receptive_fields


def test_svd_cost_and_the_probe_in_closed_form():
    assert svd_multiply_adds((64, 32, 3, 3)) == 8 * 64 * 288 * 64  # a conv weight read as 64 × 288
    assert svd_multiply_adds((10, 1000)) == 8 * 10 * 1000 * 10
    ctx = make_context("resnet8")
    images, seconds, per_mac = probe(ctx)
    assert images == max(4, min(64, int(2e10 // ctx.multiply_adds()))) and seconds > 0
    # the mean of the forward-and-backward rate (a backward counts as two forwards) and the forward-only one
    assert 0 < per_mac < seconds / (images * ctx.multiply_adds())
    assert all(p.grad is None for p in ctx.model.parameters())  # the probe leaves no gradients behind


def test_estimates_count_the_passes_each_plugin_makes():
    ctx = make_context("resnet8", twin="plain8", plugin="activations", options={"activations": {"samples": 50}})
    macs = ctx.multiply_adds()
    # activations: one forward of the 50 images through model and twin (nothing trained: no second state)
    assert activations.resinspect_estimate(ctx) == 5 * macs * 50 * 2
    ctx.plugin = "similarity"
    assert similarity.resinspect_estimate(ctx) == pytest.approx(1.3 * macs * 128 * 2)  # all 128 test images
    ctx.plugin = "landscape"  # no --compute budget: the whole grid, the curve, 256 images of the 256 there are
    assert landscape.resinspect_estimate(ctx) == (21 * 21 + 51) * 256 * 2 * macs
    ctx.plugin = "curvature"
    assert curvature.resinspect_estimate(ctx) == 5 * (100 + 40) * 256 * 2 * macs


def test_landscape_and_curvature_fit_the_compute_budget_and_say_what_they_cut():
    ctx = make_context("resnet8", twin="plain8")
    macs = ctx.multiply_adds()
    ctx.compute = 20_000 * macs  # room for 20 000 image passes
    opts, cost, cuts = landscape.plan_of(ctx, ctx.options("landscape"))
    # 256 images → 128 → 64 → 32; (441 + 51)·32·2 > 20 000, so the grid shrinks: 19², 17² … until it fits
    assert opts["samples"] == 32 and (opts["resolution"] ** 2 + opts["resolution_1d"]) * 32 * 2 <= 20_000
    assert ((opts["resolution"] + 2) ** 2 + opts["resolution_1d"]) * 32 * 2 > 20_000
    assert opts["resolution"] % 2 == 1 and cost == (opts["resolution"] ** 2 + 51) * 32 * 2 * macs
    assert cuts[0] == "32 training images instead of 256" and "grid instead of 21×21" in cuts[1]
    said = landscape.fitted_finding(ctx, cuts)
    assert said.startswith("Fitted to the compute budget") and "--compute 0" in said
    opts, cost, cuts = curvature.plan_of(ctx, ctx.options("curvature"))
    # 5·(100 + 40)·32·2 > 20 000 → 20 probes → 10 probes → 5·(100 + 10)·64 > 20 000 → 50 products: fits
    assert opts["samples"] == 32 and opts["probes"] == 10 and opts["max_iter"] == 50
    assert cost == 5 * (50 + 10) * 32 * 2 * macs <= 20_000 * macs
    ctx.compute = 0  # no budget: nothing cut
    assert landscape.plan_of(ctx, ctx.options("landscape"))[2] == []


def test_attribution_memory_bound_leaves_the_maps_unchanged():
    torch.manual_seed(0)
    ctx = make_context("resnet8")
    x, _ = next(ctx.test_batches(6))
    target = ctx.model(x).argmax(1)
    opts = dict(ctx.options("attribution"), ig_steps=8)
    for key in ("saliency", "integrated_gradients", "occlusion"):
        whole = attribute(ctx.model, key, x, target, dict(opts, images_at_once=64))
        chunked = attribute(ctx.model, key, x, target, dict(opts, images_at_once=2))  # three chunks of 2
        assert torch.allclose(whole, chunked, atol=1e-6), key


def test_the_sanity_check_recomputes_maps_at_evenly_spaced_steps_when_the_budget_is_tight(tmp_path):
    assert checkpoints(17, 3) == [0, 8, 16] and checkpoints(10, 10) == list(range(10))
    assert checkpoints(5, 1) == [4] and checkpoints(4, 9) == [0, 1, 2, 3]
    ctx = make_context("resnet8", plugin="attribution")
    macs = ctx.multiply_adds()
    opts = dict(ctx.options("attribution"), images=2)
    methods = attribution.method_names(ctx.model, opts["methods"])
    maps_each = sum(attribution._passes(k, opts, (8, 8)) for _, k, _ in methods)
    per_image = maps_each + 2 * (opts["curve_steps"] + 1) * (len(methods) + 1) + 1
    # room for the 2 images attributed and 3 rounds of maps, not for the 4 randomisation steps of 1 image
    ctx.compute = (2 * per_image + 3.5 * maps_each) * macs
    fitted, plan = attribution.plan_of(ctx, opts)
    steps = len(attribution._randomisation_steps(ctx.model))
    assert fitted["images"] == 2 and fitted["sanity_images"] == 1 and fitted["sanity_points"] == 3 < steps
    assert "recomputed after 3 of the 4 randomisation steps" in plan.cuts[-1]
    result = resinspect.run(model="resnet8", data="digits", epochs=0, plugins=["attribution"], out=tmp_path / "r",
                            device="cpu", compute=ctx.compute, data_args={"size": 8},
                            options={"attribution": {"images": 2}},
                            tb_skip=["graph", "projector", "layout"])
    section = result.results.plugins["attribution"].sections[0]
    table = next(t for t in section.tables if t.title.startswith("Sanity check"))
    assert len(table.columns) == 1 + 3 and "after 3 of the 4 steps" in table.caption


def test_peak_memory_is_measured_per_phase():
    if not PEAK_IS_PER_PHASE:
        pytest.skip("the resident-set peak cannot be reset on this system")
    reset_peak()
    base = peak_rss_mb()
    block = bytearray(300 * 1024 * 1024)  # 300 MiB, touched
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_mb() >= base + 290
    del block
    reset_peak()
    assert peak_rss_mb() < base + 150


def test_a_run_says_its_estimate_first_and_keeps_it_beside_the_measured_seconds(tmp_path, capfd):
    result = resinspect.run(model="resnet8", data="digits", epochs=1, twin=True, out=tmp_path / "r", device="cpu",
                            plugins=["summary", "activations", "ablation", "blockgain"], narrate=True,
                            data_args={"size": 8}, tb_skip=["graph", "projector", "layout"])
    assert result.status == "complete"
    err = capfd.readouterr().err
    line = next(ln for ln in err.splitlines() if "estimate:" in ln)
    assert "no estimate from blockgain" in line and "ablation" in line and "probe pass" in line
    assert err.index("estimate:") < err.index("analyze: start")
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    plugins = data["plugins"]
    for name in ("summary", "activations", "ablation"):
        assert plugins[name]["estimate_seconds"] >= 0 and plugins[name]["peak"]["rss_mb"] > 0
    assert "estimate_seconds" not in plugins["blockgain"]
    est = data["environment"]["estimate"]
    assert est["total_seconds"] == pytest.approx(sum(plugins[n]["estimate_seconds"] for n in
                                                     ("summary", "activations", "ablation")), abs=0.05)
    html = (tmp_path / "r" / "index.html").read_text()
    assert "plugins: seconds (estimated), peak memory" in html and "est. " in html


def test_receptive_fields_are_measured_on_a_probe_large_enough():
    model = torchvision.models.resnet50().eval()
    stages = {n: model.get_submodule(n) for n in ("layer1", "layer2", "layer3", "layer4")}
    fields = receptive_fields(model, stages, 3, torch.device("cpu"), 224)
    # the theoretical receptive fields of torchvision's ResNet-50 stages: 35, 91, 267, 427 pixels
    assert {k: f for k, (f, _) in fields.items()} == {"layer1": 35, "layer2": 91, "layer3": 267, "layer4": 427}
    assert fields["layer3"][1] == 448  # measured again on a probe twice as large: 267 fills 224
    capped = receptive_fields(model, {"layer4": stages["layer4"]}, 3, torch.device("cpu"), 96, largest=96)
    assert capped == {"layer4": (96, 96)}  # fills the largest probe allowed: at least 96


def test_attribution_on_a_model_far_over_budget_gets_coarser_settings_then_one_image():
    ctx = make_context("resnet8", plugin="attribution")
    ctx.compute = 100 * ctx.multiply_adds()  # 100 passes of one image: not even one image of the full study
    fitted, plan = attribution.plan_of(ctx, ctx.options("attribution"))
    assert (fitted["curve_steps"], fitted["ig_steps"], fitted["smoothgrad_samples"]) == (10, 16, 8)
    assert fitted["images"] == 1 and fitted["sanity_images"] == 1 and fitted["sanity_points"] == 2
    assert plan.cuts[:3] == ["curve_steps 10 instead of 20", "ig_steps 16 instead of 32",
                             "smoothgrad_samples 8 instead of 16"]
    assert "1 image(s) attributed instead of 32" in plan.cuts[3]
