"""Residual sites: every residual addition a branch of its own (transformer layers add two), twins per branch
kind, the head, and the lens and rank plugins that read the stream."""

import collections
import copy

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import resinspect
from helpers import hook_count, overridden_forwards
from resinspect.anatomy import block_module, bypass, drop_skip, residual_blocks
from resinspect.models import build_model
from resinspect.models.registry import plain_twin_of, remove_skips
from resinspect.readout import NoHead, find_head


def _kinds(model):
    return collections.Counter(b.kind for b in residual_blocks(model))


@pytest.mark.parametrize(
    "builder,kinds",
    [
        ("vit_b_16", {"attention": 12, "mlp": 12}),
        ("swin_t", {"attention": 12, "mlp": 12}),
        ("convnext_tiny", {"conv": 18}),
        ("mobilenet_v2", {"conv": 10}),
        ("efficientnet_b0", {"conv": 9}),
    ],
)
def test_sites_of_torchvision_models(builder, kinds):
    model = getattr(tvm, builder)()
    assert _kinds(model) == kinds


def test_sites_are_named_by_layer_and_kind():
    blocks = residual_blocks(tvm.vit_b_16())
    assert [b.name for b in blocks[:2]] == [
        "encoder.layers.encoder_layer_0.attention",
        "encoder.layers.encoder_layer_0.mlp",
    ]
    assert {b.layer for b in blocks[:2]} == {"encoder.layers.encoder_layer_0"}
    assert blocks[0].branch_modules == ["ln_1", "self_attention", "dropout"]
    assert blocks[1].branch_modules == ["ln_2", "mlp"]
    assert [b.index for b in blocks] == list(range(24)) and {b.stage for b in blocks} == {1}
    table = resinspect.anatomy.block_table(blocks[:2])
    assert [(r["kind"], r["layer"]) for r in table] == [("attention", blocks[0].layer), ("mlp", blocks[0].layer)]


def test_vit_tiny_has_an_attention_and_an_mlp_site_per_layer():
    model = build_model("vit-tiny", 3, 5, 32)
    blocks = residual_blocks(model)
    assert [b.name for b in blocks[:2]] == ["layers.0.attention", "layers.0.mlp"]
    assert _kinds(model) == {"attention": 6, "mlp": 6}
    assert _kinds(build_model("vit-tiny-4", 3, 5, 32)) == {"attention": 4, "mlp": 4}


class UserLayer(nn.Module):
    """A user's transformer block: two inline additions, a post-norm after each (as the original Transformer)."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d))

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        x = self.norm2(x + self.ff(x))
        return x


class UserTransformer(nn.Module):
    def __init__(self, depth=3, d=8, classes=4):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.layers = nn.ModuleList(UserLayer(d) for _ in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def _by_hand(model, x, switched):
    """UserTransformer's forward written out, with ``switched[(layer, kind)]`` = "bypass" | "drop"."""
    x = model.embed(x)
    for i, layer in enumerate(model.layers):
        a = layer.attn(x, x, x, need_weights=False)[0]
        mode = switched.get((i, "attention"))
        x = layer.norm1(x if mode == "bypass" else a if mode == "drop" else x + a)
        f = layer.ff(x)
        mode = switched.get((i, "mlp"))
        x = layer.norm2(x if mode == "bypass" else f if mode == "drop" else x + f)
    return model.head(x.mean(1))


def test_a_user_block_with_two_inline_additions_has_two_switchable_sites():
    torch.manual_seed(0)
    model = UserTransformer().eval()
    x = torch.randn(4, 5, 3)
    blocks = residual_blocks(model)
    assert [b.name for b in blocks] == [f"layers.{i}.{k}" for i in range(3) for k in ("attention", "mlp")]
    before = model(x)
    with torch.no_grad():
        assert torch.allclose(model(x), _by_hand(model, x, {}), atol=1e-6)
        with bypass(model, "layers.1.mlp"):
            assert torch.allclose(model(x), _by_hand(model, x, {(1, "mlp"): "bypass"}), atol=1e-6)
        with drop_skip(model, ["layers.0.attention", "layers.2.mlp"]):
            want = _by_hand(model, x, {(0, "attention"): "drop", (2, "mlp"): "drop"})
            assert torch.allclose(model(x), want, atol=1e-6)
        with bypass(model, [b for b in blocks if b.kind == "attention"]):
            want = _by_hand(model, x, {(i, "attention"): "bypass" for i in range(3)})
            assert torch.allclose(model(x), want, atol=1e-6)
    assert torch.equal(model(x), before)  # restored exactly
    assert overridden_forwards(model) == [] and hook_count(model) == 0


def test_bypassing_a_site_of_torchvision_vit_removes_that_branch_only():
    """The defect of the issue: bypassing "the block" kept the MLP. Now each addition switches alone."""
    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)

    def by_hand(switched):
        h = model._process_input(x)
        h = torch.cat([model.class_token.expand(len(x), -1, -1), h], 1) + model.encoder.pos_embedding
        for i, layer in enumerate(model.encoder.layers):
            a = layer.self_attention(layer.ln_1(h), layer.ln_1(h), layer.ln_1(h), need_weights=False)[0]
            mode = switched.get((i, "attention"))
            h = h if mode == "bypass" else a if mode == "drop" else a + h
            f = layer.mlp(layer.ln_2(h))
            mode = switched.get((i, "mlp"))
            h = h if mode == "bypass" else f if mode == "drop" else f + h
        return model.heads(model.encoder.ln(h)[:, 0])

    blocks = {b.name: b for b in residual_blocks(model)}
    site = "encoder.layers.encoder_layer_0."
    with torch.no_grad():
        assert (model(x) - by_hand({})).abs().max() < 1e-6
        with bypass(model, blocks[site + "attention"]):
            assert (model(x) - by_hand({(0, "attention"): "bypass"})).abs().max() < 1e-6
        with bypass(model, blocks[site + "mlp"]):
            assert (model(x) - by_hand({(0, "mlp"): "bypass"})).abs().max() < 1e-6
        with drop_skip(model, blocks[site + "mlp"]):
            assert (model(x) - by_hand({(0, "mlp"): "drop"})).abs().max() < 1e-6
        twin = remove_skips(copy.deepcopy(model))
        assert (twin(x) - by_hand({(i, k): "drop" for i in range(2) for k in ("attention", "mlp")})).abs().max() < 1e-6
        attention_twin = remove_skips(copy.deepcopy(model), "attention")
        assert (attention_twin(x) - by_hand({(i, "attention"): "drop" for i in range(2)})).abs().max() < 1e-6
    assert [b.kind for b in residual_blocks(attention_twin)] == ["mlp", "mlp"]
    assert residual_blocks(twin) == []
    # the twin's site modules are still found by name (for side-by-side analyses)
    assert block_module(twin, site + "mlp") is not block_module(model, site + "mlp")


@pytest.mark.parametrize("kind", [None, "attention", "mlp"])
def test_twins_per_kind_have_the_models_parameters_at_initialisation(kind):
    torch.manual_seed(3)
    model = build_model("vit-tiny-2", 3, 5, 32)
    torch.manual_seed(3)
    twin = plain_twin_of("vit-tiny-2", 3, 5, 32, kind=kind)
    a, b = model.state_dict(), twin.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    left = collections.Counter(b.kind for b in residual_blocks(twin))
    assert left == ({} if kind is None else {"mlp" if kind == "attention" else "attention": 2})


def test_a_twin_kind_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match="no residual sites of kind 'attention'.*its kinds: conv"):
        remove_skips(build_model("resnet8"), "attention")


def _last_stream(model, layer, x):
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.setdefault("s", o))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return out, seen["s"]


@pytest.mark.parametrize(
    "name,size,modules",
    [
        ("resnet20", 16, ["pool", "fc"]),
        ("vit-tiny-2", 32, ["norm", "head"]),
        ("torchvision:resnet18", 64, ["avgpool", "fc"]),
        ("torchvision:convnext_tiny", 64, ["avgpool", "classifier"]),
        ("torchvision:mobilenet_v2", 64, ["features.17", "features.18", "classifier"]),
    ],
)
def test_the_head_reproduces_the_logits_from_the_last_stream(name, size, modules):
    torch.manual_seed(0)
    model = build_model(name, 3, 7, size).eval()
    layer = residual_blocks(model)[-1].layer
    head = find_head(model, layer)
    assert [str(n.target) for n in head.graph.nodes if n.op == "call_module"] == modules
    out, stream = _last_stream(model, layer, torch.randn(3, 3, size, size))
    assert torch.equal(head(stream), out)


def test_the_head_of_torchvision_vit_is_norm_class_token_and_heads():
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    layer = residual_blocks(model)[-1].layer
    head = find_head(model, layer)
    out, stream = _last_stream(model, layer, torch.randn(2, 3, 32, 32))
    assert torch.equal(head(stream), out)
    assert torch.equal(head(stream), model.heads(model.encoder.ln(stream)[:, 0]))


def test_a_head_that_reads_more_than_the_stream_is_refused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.fc = nn.Linear(4, 4), UserLayer(4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.stem(x)
            return self.fc(self.block(h).mean(1) + h.mean(1))  # the head reads the stem too

    with pytest.raises(NoHead, match="also reads other values"):
        find_head(Mixed(), "block")


def _zero_branches(model):
    with torch.no_grad():
        for layer in model.layers:
            for linear in (layer.attn.proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return model


def test_lens_reads_every_site_at_the_final_accuracy_when_the_branches_are_zero(tmp_path):
    """Every branch adds 0, so every point of the stream is the embedding: the head reads each one exactly as it
    reads the last (accuracy equal, KL 0)."""
    torch.manual_seed(0)
    model = _zero_branches(build_model("vit-tiny-2", 3, 5, 32))
    result = resinspect.run(
        model=model, data="shapes", epochs=0, plugins=["lens"], out=tmp_path / "run",
        options={"lens": {"samples": 64, "fit_samples": 16, "steps": 2}},
    )
    m = result.section("lens").metrics
    points = ["input"] + [b.name for b in residual_blocks(model)]
    assert m["model/points"] == len(points) == 5
    for p in points:
        assert m[f"model/logit/accuracy/{p}"] == m["model/final_accuracy"]
        assert abs(m[f"model/logit/kl/{p}"]) < 1e-9
    assert m["model/logit/converged_from"] == "input"


def test_lens_on_resnet_reads_the_last_stage_directly_and_the_rest_through_translators(tmp_path):
    result = resinspect.run(
        model="resnet8", data="digits", epochs=0, plugins=["lens"], out=tmp_path / "run", twin=True,
        options={"lens": {"samples": 64, "fit_samples": 32, "steps": 3}},
    )
    m = result.section("lens").metrics
    # resnet8: layer1.0, layer2.0, layer3.0; only layer3.0's output has the last stream's shape
    assert m["model/points"] == 4 and m["model/logit/points_read"] == 1
    assert m["model/tuned/points_read"] == 4 and m["model/probe/points_read"] == 4
    assert m["twin/logit/points_read"] == 1
    # the last point read through the head is the model's own output
    assert m["model/logit/accuracy/layer3.0"] == m["model/final_accuracy"]
    assert m["model/logit/kl/layer3.0"] < 1e-9


def test_a_plugin_that_does_not_apply_is_skipped_not_failed(tmp_path):
    result = resinspect.run(model="plain8", data="digits", epochs=0, plugins=["lens", "rank"], out=tmp_path / "run")
    assert result.status == "complete"
    for plugin in ("lens", "rank"):
        assert result.results.plugins[plugin].status == "skipped"
        (finding,) = result.section(plugin).findings
        assert finding.text.startswith("Skipped: plain8 has no residual blocks")
    import json

    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["plugins"]["lens"]["status"] == "skipped"
    assert "skipped</span>" in (tmp_path / "run" / "index.html").read_text()


def test_rank_measures_in_closed_form():
    from resinspect_plugins.rank import measures

    x = torch.tensor([1.0, -2.0, 3.0])
    collapsed = measures(x.expand(1, 5, 3))
    assert collapsed["residual"].item() == 0 and collapsed["residual_fro"].item() == 0
    assert abs(collapsed["effective_rank"].item() - 1) < 1e-12 and abs(collapsed["cosine"].item() - 1) < 1e-12
    eye = measures(torch.eye(4)[None])
    # I - 1/4: every column and row sums to 3/4 + 3·1/4 = 1.5 in absolute value; ‖I‖₁ = ‖I‖∞ = 1
    assert abs(eye["residual"].item() - 1.5) < 1e-12
    assert abs(eye["residual_fro"].item() - (0.75**2 * 4 + 0.25**2 * 12) ** 0.5 / 2) < 1e-12
    assert abs(eye["effective_rank"].item() - 4) < 1e-9 and abs(eye["cosine"].item()) < 1e-12


def test_rank_pure_attention_collapses_and_the_skips_prevent_it(tmp_path):
    result = resinspect.run(
        model="vit-tiny-8", data="shapes", epochs=0, plugins=["rank"], out=tmp_path / "run",
        options={"rank": {"samples": 16}},
    )
    m = result.section("rank").metrics
    pure = [m[f"trained/pure_attention/residual/layers.{i}.attention"] for i in range(8)]
    first = m["trained/pure_attention/residual/input"]
    assert first > 0.3 and pure[-1] < 1e-3 * first  # every token the same vector (Dong et al. 2021)
    assert m["trained/model/residual_last"] > 0.5 * m["trained/model/residual/input"]
    assert "collapses towards rank one and the skips prevent it" in " ".join(f.text for f in result.section("rank").findings)


def test_twin_kind_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from resinspect.cli import main

    out = tmp_path / "run"
    got = CliRunner().invoke(main, ["run", "--model", "vit-tiny-2", "--data", "shapes", "--epochs", "0",
                                    "--twin-kind", "attention", "--plugins", "summary", "-O", str(out)])
    assert got.exit_code == 0, got.output
    import json

    saved = json.loads((out / "results.json").read_text())
    assert saved["model"]["twin"]["name"] == "plain-attention:vit-tiny-2"
    got = CliRunner().invoke(main, ["run", "--model", "resnet8", "--epochs", "0", "--twin-kind", "mlp",
                                    "--plugins", "summary", "-O", str(tmp_path / "bad")])
    assert got.exit_code != 0 and "no residual sites of kind 'mlp'" in got.output
    assert "Traceback" not in got.output


def test_gradcam_reads_a_token_stream_as_its_patch_grid():
    from resinspect_plugins._attribution_methods import _gradcam, token_grid

    assert token_grid(65) == (1, 8, 8) and token_grid(64) == (0, 8, 8) and token_grid(197) == (1, 14, 14)
    torch.manual_seed(0)
    model = build_model("vit-tiny-2", 3, 5, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    cam = _gradcam(model, x, torch.tensor([1, 3]), {}, stage=model.layers)
    # by hand, on the stream entering the last layer: token features weighted by their mean gradient over the
    # 64 patch tokens, ReLU, upsampled
    seen = {}
    handle = model.layers[-1].register_forward_hook(lambda m, i, o: seen.update(a=i[0]))
    a = None
    try:
        logits = model(x)
        a = seen["a"]
        (g,) = torch.autograd.grad(logits[0, 1] + logits[1, 3], a)
    finally:
        handle.remove()
    want = torch.relu((g[:, 1:].mean(1, keepdim=True) * a[:, 1:]).sum(-1)).reshape(2, 1, 8, 8).detach()
    want = torch.nn.functional.interpolate(want, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(cam, want, atol=1e-6) and cam.abs().sum() > 0


def test_attention_rollout_by_hand_and_for_uniform_attention():
    from resinspect_plugins._attribution_methods import _rollout, method_names

    torch.manual_seed(0)
    model = build_model("vit-tiny-2", 3, 5, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    got = _rollout(model, x, None, {})
    weights = []
    for layer in model.layers:
        layer.attn.keep_weights = True
    with torch.no_grad():
        model(x)
    for layer in model.layers:
        weights.append(layer.attn.last_weights.mean(1).double())
        layer.attn.keep_weights = False
    eye = torch.eye(65, dtype=torch.float64)
    r = eye
    for a in weights:
        a = 0.5 * a + 0.5 * eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    want = torch.nn.functional.interpolate(r[:, 0, 1:].reshape(2, 1, 8, 8).float(), size=(32, 32), mode="bilinear")
    assert torch.allclose(got, want[:, 0], atol=1e-6)
    with torch.no_grad():  # no query/key: every token attends to all equally, and no patch stands out
        for layer in model.layers:
            layer.attn.qkv.weight.zero_()
            layer.attn.qkv.bias.zero_()
    flat = _rollout(model, x, None, {})
    assert torch.allclose(flat, flat[:, :1, :1].expand_as(flat), atol=1e-7)
    # offered only where there is attention
    assert [k for _, k, _ in method_names(model, ["attention_rollout"])] == ["attention_rollout"]
    assert method_names(build_model("resnet8"), ["attention_rollout"]) == []


def test_attention_rollout_reads_torchvision_multihead_attention():
    from resinspect_plugins._attribution_methods import _rollout

    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5).eval()
    maps = _rollout(model, torch.randn(2, 3, 32, 32), None, {})
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and (maps > 0).all()
    assert hook_count(model) == 0
