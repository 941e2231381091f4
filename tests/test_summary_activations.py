import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import UserResNet
from resinspect.anatomy import residual_blocks
from resinspect.models import build_model
from resinspect.testing import hook_count, make_context, overridden_forwards, run_plugin, tiny_data
from resinspect_plugins import activations, summary
from resinspect_plugins._formulas import batchnorm_backward, conv_backward, linear_backward


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=96, test=48)


def _brute_force_range(n):
    frac = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    for width in range(n + 1):
        for lo in range(n + 1 - width):
            hi = lo + width
            if lo + hi == n and sum(frac[lo:hi + 1]) >= 0.95:  # centred on N/2
                return lo, hi
    return 0, n


@pytest.mark.parametrize("model,n_blocks", [("resnet20", 9), ("torchvision:resnet50", 16)])
def test_block_map_and_path_distribution(model, n_blocks, tmp_path, data):
    section = run_plugin("summary", model=model, data=data, epochs=0, out=tmp_path)
    assert section.metrics["residual_blocks"] == n_blocks and section.metrics["paths"] == 2 ** n_blocks
    block_map = next(t for t in section.tables if t.title == "Residual block map")
    assert len(block_map.rows) == n_blocks
    paths = next(t for t in section.tables if t.title.startswith("Unraveled view"))
    assert [r[1] for r in paths.rows] == [math.comb(n_blocks, k) for k in range(n_blocks + 1)]
    assert sum(r[1] for r in paths.rows) == 2 ** n_blocks
    lo, hi = _brute_force_range(n_blocks)
    assert (section.metrics["path_length_95_low"], section.metrics["path_length_95_high"]) == (lo, hi)
    if model == "resnet20":
        assert (lo, hi) == (2, 7)
        def block(cin, c, projection):  # two 3x3 convs + two BNs (+ 1x1 conv and BN)
            return 9 * cin * c + 2 * c + 9 * c * c + 2 * c + (cin * c + 2 * c if projection else 0)
        expected = [block(16, 16, False)] * 3 + [block(16, 32, True)] + [block(32, 32, False)] * 2 + \
            [block(32, 64, True)] + [block(64, 64, False)] * 2
        assert [r[4] for r in block_map.rows] == expected
        layers = next(t for t in section.tables if t.title.startswith("Layers (torchinfo"))
        assert layers.rows[0][2] == sum(p.numel() for p in section.run_result.model.parameters())


def test_receptive_field_matches_the_arithmetic():
    m = build_model("resnet20").eval()
    stages = {n: m.get_submodule(n) for n in ("layer1", "layer2", "layer3")}
    fields = summary.receptive_fields(m, stages, 3, torch.device("cpu"))
    # r_out = r_in + (k - 1) * jump_in, jump_out = jump_in * stride, over the 3x3 convs of the longest path
    r, jump, expected = 1, 1, {}
    convs = [("stem", 1)] + [(f"layer{st}", 2 if st > 1 and i == 0 else 1) for st in (1, 2, 3) for i in range(6)]
    for stage, stride in convs:
        r, jump = r + 2 * jump, jump * stride
        expected[stage] = r
    del expected["stem"]
    assert {k: f for k, (f, _) in fields.items()} == expected == {"layer1": 15, "layer2": 37, "layer3": 81}
    assert {size for _, size in fields.values()} == {96}  # all within the first probe


def test_plain_twin_has_one_path(tmp_path, data):
    section = run_plugin("summary", model="plain20", data=data, epochs=0, out=tmp_path)
    assert section.metrics["residual_blocks"] == 0 and section.metrics["paths"] == 1
    assert "0 residual blocks, 1 path" in section.findings[0].text


def test_response_statistics_equal_a_direct_computation():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10).eval()
    x = torch.randn(23, 1, 8, 8)
    batches = [(x[i:i + 5], None) for i in range(0, 23, 5)]
    stats = activations.collect(model, batches)
    outs = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o))
               for n, m in activations.response_layers(model)]
    with torch.no_grad():
        for xb, _ in batches:
            model(xb)
    for h in handles:
        h.remove()
    assert set(outs) == set(stats.responses) and len(outs) == 19  # 18 block convs + the stem's
    for n, o in outs.items():
        # the per-batch sums give the std of all outputs of the whole set at once
        assert stats.responses[n].std == pytest.approx(torch.cat(o).double().std().item(), rel=1e-9)
    # per-block ratio and cosine, and the residual stream's channel statistics, on the whole set at once
    for b in residual_blocks(model):
        inp = {}
        h = b.module.register_forward_hook(lambda m, i, o: inp.update(x=i[0], y=o))
        with torch.no_grad():
            model(x)
            f, s = b.branch(inp["x"]).flatten(1), b.shortcut(inp["x"]).flatten(1)
        h.remove()
        # one forward of all 23 images vs 5 batches: float32 convolutions may round differently
        ratio = (f.norm(dim=1) / s.norm(dim=1)).mean().item()
        cos = F.cosine_similarity(f, s, dim=1).mean().item()
        assert stats.ratio_sum[b.name] / 23 == pytest.approx(ratio, rel=1e-4)
        assert stats.cos_sum[b.name] / 23 == pytest.approx(cos, rel=1e-4, abs=1e-5)
        y = inp["y"].double()
        ch_mean = y.mean((0, 2, 3))
        assert stats.stream[b.name].mean_sq_channel_mean() == pytest.approx((ch_mean ** 2).mean().item(), rel=1e-4)
        assert stats.stream[b.name].avg_channel_var() == pytest.approx(
            y.var((0, 2, 3), unbiased=False).mean().item(), rel=1e-4)


def test_block_with_zeroed_branch_has_ratio_zero():
    model = UserResNet(depth=2).eval()
    with torch.no_grad():
        last = model.body[1].f[3]
        last.weight.zero_()
        last.bias.zero_()
    stats = activations.collect(model, [(torch.randn(6, 1, 8, 8), None)])
    assert stats.ratio_sum["body.1"] == 0.0
    assert stats.ratio_sum["body.0"] > 0


def test_dead_units_are_counted():
    model = UserResNet(depth=1).eval()
    with torch.no_grad():
        bn = model.body[0].f[1]
        bn.bias[:4] = -1e6  # four of eight channels can never be positive after the BN
    stats = activations.collect(model, [(torch.randn(6, 1, 8, 8), None)])
    assert (stats.relu_max["body.0.f.2#0"] <= 0).float().mean().item() == 0.5


@pytest.mark.parametrize("model", ["resnet20", "plain20", "torchvision:resnet18", "user"])
def test_summary_and_activations_run_on_every_kind_of_model(model, tmp_path, data):
    for plugin in ("summary", "activations"):
        m = UserResNet() if model == "user" else model
        section = run_plugin(plugin, model=m, data=data, epochs=0, out=tmp_path / plugin)
        net = section.run_result.model
        assert hook_count(net) == 0 and overridden_forwards(net) == [] and not net.training
        assert section.tables


def test_activations_twin_comparison_and_formula_section(tmp_path, data):
    import resinspect

    result = resinspect.run(model="resnet20", twin=True, data=data, plugins=["activations", "formulas"], epochs=1,
                            device="cpu", out=tmp_path)
    (act,), (formulas,) = result.sections["activations"], result.sections["formulas"]
    assert act.findings[0].text.startswith("Response strength")
    assert "twin/response_std_mean" in act.metrics
    kinds = {r[0] for r in formulas.tables[0].rows}
    assert kinds == {"conv", "batchnorm", "relu", "linear", "residual"}
    assert all(r[2] < 1e-9 for r in formulas.tables[0].rows)
    assert formulas.findings[0].severity == "good"


def test_formulas_against_autograd_directly():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dx, dw, db = torch.autograd.grad(y, [x, conv.weight, conv.bias], dy)
    fx, fp = conv_backward(x.detach(), conv.weight.detach(), conv.bias, dy, conv)
    assert torch.allclose(fx, dx) and torch.allclose(fp["weight"], dw) and torch.allclose(fp["bias"], db)
    bn = torch.nn.BatchNorm2d(3).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    y = bn(x)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dx, dg, dbeta = torch.autograd.grad(y, [x, bn.weight, bn.bias], dy)
    fx, fp = batchnorm_backward(x.detach(), bn.weight.detach(), bn.bias, dy, bn.eps)
    assert torch.allclose(fx, dx) and torch.allclose(fp["weight"], dg) and torch.allclose(fp["bias"], dbeta)
    lin = torch.nn.Linear(5, 2).double()
    xl = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = lin(xl)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dx, dw, db = torch.autograd.grad(y, [xl, lin.weight, lin.bias], dy)
    fx, fp = linear_backward(xl.detach(), lin.weight.detach(), lin.bias, dy)
    assert torch.allclose(fx, dx) and torch.allclose(fp["weight"], dw) and torch.allclose(fp["bias"], db)
