import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resinspect
from helpers import UserResNet
from resinspect.plugins import PluginHost, PluginInfo
from resinspect.testing import TwoBlockNet, hook_count, overridden_forwards, run_plugin, tiny_data
from resinspect_plugins import gradflow, weights
from resinspect_plugins import _gradrecorder
from resinspect_plugins._gradrecorder import GradRecorder


class Reference:
    """Records p.grad norms directly at the same hook point as gradflow."""

    def __init__(self):
        self.rows = []

    @resinspect.hookimpl
    def resinspect_after_backward(self, ctx, step):
        if step.role == "model":
            self.rows.append([[p.grad.norm().item(), p.grad.abs().mean().item(), p.grad.abs().max().item()]
                              for p in step.model.parameters()])


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=128, test=64)


def test_recorded_norms_equal_a_direct_computation(tmp_path, data):
    host = PluginHost()
    ref = Reference()
    host.add(PluginInfo("reference", ref, "test"))
    result = resinspect.run(model=UserResNet(), data=data, plugins=["gradflow", "reference"], epochs=2, device="cpu",
                            out=tmp_path / "r", host=host, options={"gradflow": {"every": 1}})
    section = result.section("gradflow")
    assert section.status == "ok", section.traceback
    table = section.tables[0]
    expected = np.array(ref.rows)  # [steps, params, 3]
    medians = np.median(expected[:, :, 0], axis=0)
    got = np.array([row[2] for row in table.rows])
    np.testing.assert_allclose(got, medians, rtol=1e-5)
    np.testing.assert_allclose([row[4] for row in table.rows], expected[:, :, 2].max(0), rtol=1e-5)
    np.testing.assert_allclose([row[3] for row in table.rows], np.median(expected[:, :, 1], axis=0), rtol=1e-5)


def test_recorder_arrays_match_reference_per_step():
    torch.manual_seed(0)
    model = UserResNet(depth=2)
    rec = GradRecorder("model", model, every=1, block_every=1)
    rec.attach(torch.device("cpu"))
    ref = []
    try:
        for step in range(3):
            model.zero_grad()
            x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
            F.cross_entropy(model(x), y).backward()
            ref.append([[p.grad.norm().item(), p.grad.abs().mean().item(), p.grad.abs().max().item()]
                        for p in model.parameters()])
            rec.record(step)
    finally:
        rec.detach()
    params, _ = rec.arrays()
    np.testing.assert_allclose(params.transpose(0, 2, 1), np.array(ref), rtol=1e-5)
    assert overridden_forwards(model) == [] and hook_count(model) == 0


def test_branch_and_skip_parts_sum_to_the_input_gradient():
    """TwoBlockNet: b_i(x) = x + W_i x, identity shortcut and no post-activation, so with g = dL/dy:
    skip part = g, branch part = W_i^T g, dL/dx = (I + W_i)^T g."""
    net = TwoBlockNet(in_features=4, num_classes=2, a=0.5, b=-0.25)
    rec = GradRecorder("model", net, every=1, block_every=1)
    rec.attach(torch.device("cpu"))
    x, y = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 1, 0, 1])
    try:
        F.cross_entropy(net(x), y).backward()
        rec.record(0)
    finally:
        rec.detach()
    _, blocks = rec.arrays()
    # reference by hand: the activations and their gradients
    with torch.no_grad():
        h1 = x + x @ net.b1.f.weight.T
        h2 = h1 + h1 @ net.b2.f.weight.T
        p = torch.softmax(h2 @ net.head.weight.T, 1)
        g_logits = (p - F.one_hot(y, 2).float()) / len(y)
        g2 = g_logits @ net.head.weight                      # dL/d(output of block 2)
        g1 = g2 + g2 @ net.b2.f.weight                       # dL/d(output of block 1) = (I + W2)^T g2
        g0 = g1 + g1 @ net.b1.f.weight
    for j, (g_out, W) in enumerate(((g1, net.b1.f.weight), (g2, net.b2.f.weight))):
        out, skip, branch, total = blocks[0, j]
        assert out == pytest.approx(g_out.norm().item(), rel=1e-5)
        assert skip == pytest.approx(g_out.norm().item(), rel=1e-5)
        assert branch == pytest.approx((g_out @ W).norm().item(), rel=1e-5)
        assert total == pytest.approx((g_out + g_out @ W).norm().item(), rel=1e-5)
    assert blocks[0, 0, 3] == pytest.approx(g0.norm().item(), rel=1e-5)


def test_split_forward_keeps_the_two_contributions_apart():
    m = UserResNet(depth=1)
    block = resinspect.residual_blocks(m)[0]
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    xb, xs = x.view_as(x), x.view_as(x)
    grads = {}
    xb.register_hook(lambda g: grads.__setitem__("branch", g))
    xs.register_hook(lambda g: grads.__setitem__("skip", g))
    out = block.variant("split")(xb, xs)
    assert torch.equal(out, m.body[0](x))
    out.square().sum().backward()
    assert torch.allclose(grads["branch"] + grads["skip"], x.grad, atol=1e-6)
    assert torch.equal(grads["skip"], 2 * out.detach())  # identity skip passes dL/dy unchanged


def test_tensorboard_histograms_and_scalars_read_back(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = resinspect.run(model="resnet20", data=data, plugins=["gradflow", "weights"], epochs=2, device="cpu",
                            out=tmp_path / "r", options={"gradflow": {"tensorboard_every": 1}})
    assert result.status == "complete"
    acc = EventAccumulator(str(tmp_path / "r" / "tb" / "model"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    hist = acc.Histograms("weights/layer1.0.conv1.weight")
    assert [h.step for h in hist] == [1, 2]
    w = result.model.layer1[0].conv1.weight.detach()
    last = hist[-1].histogram_value
    assert last.num == w.numel() and last.min == pytest.approx(w.min().item()) and \
        last.max == pytest.approx(w.max().item()) and last.sum == pytest.approx(w.sum().item(), rel=1e-4)
    assert sum(last.bucket) == w.numel()
    scalars = acc.Scalars("gradflow/grad_norm/layer1.0.conv1.weight")
    assert [s.step for s in scalars] == list(range(4))  # 2 epochs x 2 steps, every step
    table = result.section("gradflow").tables[0]
    row = next(r for r in table.rows if r[0] == "layer1.0.conv1.weight")
    assert row[2] == pytest.approx(float(np.median([s.value for s in scalars])), rel=1e-5)
    assert any(t.startswith("gradflow/branch_skip_ratio/") for t in acc.Tags()["scalars"])


def test_weight_statistics_equal_direct_computation():
    torch.manual_seed(0)
    w0 = torch.randn(6, 3, 3, 3)
    w = w0 + 0.1 * torch.randn_like(w0)
    st = weights.weight_stats(w, w0, near_zero=0.01)
    assert st["relative_change"] == pytest.approx(((w - w0).norm() / w0.norm()).item(), rel=1e-6)
    assert st["spectral_norm"] == pytest.approx(torch.linalg.svdvals(w.reshape(6, -1))[0].item(), rel=1e-5)
    assert st["max_abs"] == pytest.approx(w.abs().max().item())
    assert st["near_zero"] == pytest.approx((w.abs() < 0.01 * w.abs().max()).float().mean().item())


@pytest.mark.parametrize("model", ["resnet20", "plain20", "torchvision:resnet18", "user"])
def test_both_plugins_on_every_kind_of_model(model, tmp_path, data):
    m = UserResNet() if model == "user" else model
    for plugin in ("gradflow", "weights"):
        section = run_plugin(plugin, model=m, data=data, epochs=1, out=tmp_path / plugin)
        net = section.run_result.model
        assert hook_count(net) == 0 and overridden_forwards(net) == []
        assert section.tables and section.figures
    gf = run_plugin("gradflow", model=UserResNet() if model == "user" else model, data=data, epochs=1,
                    out=tmp_path / "again")
    n_blocks = {"resnet20": 9, "plain20": 0, "torchvision:resnet18": 8, "user": 3}[model]
    assert sum(k.startswith("model/median_branch_skip_ratio/") for k in gf.metrics) == n_blocks


def test_twin_comparison(tmp_path, data):
    result = resinspect.run(model="resnet20", twin=True, data=data, plugins=["gradflow", "weights"], epochs=1,
                            device="cpu", out=tmp_path / "r")
    gf = result.section("gradflow")
    assert "twin/first_last_ratio_median" in gf.metrics
    assert any(f.text.startswith("Residual vs plain") for f in gf.findings)
    wt = result.section("weights")
    assert any(t.title.startswith("Residual vs plain, layer for layer") for t in wt.tables)


def test_no_hooks_left_after_a_forced_failure(tmp_path, data, monkeypatch):
    calls = {"n": 0}
    original = GradRecorder.record

    def failing(self, step):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("forced failure")
        return original(self, step)

    monkeypatch.setattr(GradRecorder, "record", failing)
    model = UserResNet()
    result = resinspect.run(model=model, data=data, plugins=["gradflow"], epochs=1, device="cpu", out=tmp_path / "r")
    assert result.status == "plugins_failed"
    assert "forced failure" in result.results.plugins["gradflow"].error
    assert hook_count(model) == 0 and overridden_forwards(model) == []


def test_no_hooks_left_when_training_diverges(tmp_path, data):
    model = UserResNet()
    with torch.no_grad():
        model.head.weight.fill_(1e38)  # the logits overflow: the loss is not finite at the first step
    result = resinspect.run(model=model, data=data, plugins=["gradflow", "weights"], epochs=2, optimizer="sgd",
                            device="cpu", out=tmp_path / "r")
    assert result.status == "failed"
    assert hook_count(model) == 0 and overridden_forwards(model) == []


def test_rows_flushed_mid_epoch_still_reach_tensorboard(tmp_path, data, monkeypatch):
    """More recorded steps than the device buffer holds: every step must still be logged once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(_gradrecorder, "CAPACITY", 3)
    result = resinspect.run(model=UserResNet(), data=data, plugins=["gradflow"], epochs=2, batch_size=16,
                            device="cpu", out=tmp_path / "r",
                            options={"gradflow": {"tensorboard_every": 2, "block_every": 5}})
    assert result.status == "complete"
    acc = EventAccumulator(str(tmp_path / "r" / "tb" / "model"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradflow/grad_norm/stem.weight")]
    assert steps == list(range(0, 16, 2))  # 2 epochs x 8 steps, every second one
    ratios = [e.step for e in acc.Scalars("gradflow/branch_skip_ratio/body.0")]
    assert ratios == list(range(0, 16, 5))  # the skip/branch split runs every 5th recorded step
