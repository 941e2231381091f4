"""Plugin paths: the exact decomposition of the input gradient by path length."""

import numpy as np
import pytest
import torch

from resinspect import residual_blocks
from resinspect.models import ResNet, build_model
from resinspect.testing import TwoBlockNet, run_plugin, tiny_data
from resinspect_plugins._paths import brute_force_by_length, decompose_batch, path_gradients
from resinspect_plugins.paths import effective_range

from helpers import UserResNet


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=64, test=48)


def test_levels_add_up_to_the_autograd_gradient():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    levels, full = decompose_batch(model, residual_blocks(model), x, y)
    assert levels.shape[0] == 10
    assert (levels.sum(0) - full).norm() / full.norm() < 1e-5


@pytest.mark.parametrize("make", [lambda: UserResNet(1, 10, width=3, depth=5),
                                  lambda: ResNet((2, 2, 2), (4, 8, 16), 1, 10)],  # projections, post-add ReLU
                         ids=["user-5-blocks", "cifar-6-blocks"])
def test_every_one_of_the_2_to_the_n_paths_enumerated_agrees(make):
    torch.manual_seed(1)
    model = make().double().eval()
    blocks = residual_blocks(model)
    assert len(blocks) <= 6
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 4, 9])
    exact, _ = decompose_batch(model, blocks, x, y)
    brute = brute_force_by_length(model, blocks, x, y)
    for k in range(len(blocks) + 1):
        scale = max(exact[k].norm(), 1e-30)
        assert (exact[k] - brute[k]).norm() / scale < 1e-6, k


def test_closed_form_on_the_linear_two_block_net():
    a, b = 0.5, -0.25
    net = TwoBlockNet(a=a, b=b).double().eval()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    levels, _ = decompose_batch(net, residual_blocks(net), x, y)
    g0 = levels[0]  # the path through both skips: the output gradient itself
    assert torch.allclose(levels[1], (a + b) * g0) and torch.allclose(levels[2], a * b * g0)


def test_branches_that_output_zero_leave_everything_in_k0():
    torch.manual_seed(2)
    model = UserResNet(1, 10, width=3, depth=3).eval()
    with torch.no_grad():
        for block in model.body:
            block.f[-1].weight.zero_()
            block.f[-1].bias.zero_()
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    levels, full = decompose_batch(model, residual_blocks(model), x, y)
    assert torch.equal(levels[1:], torch.zeros_like(levels[1:]))
    assert torch.allclose(levels[0], full)


def test_sums_over_batches_are_what_one_batch_gives():
    torch.manual_seed(3)
    model = build_model("resnet20", 1, 10, 8).eval()
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    one = path_gradients(model, residual_blocks(model), [(x, y)])
    split = path_gradients(model, residual_blocks(model), [(x[:3], y[:3]), (x[3:], y[3:])])
    assert torch.allclose(one.norm_sum, split.norm_sum, rtol=1e-5) and one.count == split.count == 8


def test_effective_range_is_the_shortest_covering_range():
    assert effective_range(np.array([0.05, 0.5, 0.4, 0.05]), 0.9) == pytest.approx((1, 2, 0.9))
    assert effective_range(np.array([0.3, 0.0, 0.0, 0.7]), 0.9)[:2] == (0, 3)
    assert effective_range(np.array([0.0, 1.0, 0.0]), 0.9) == (1, 1, 1.0)


def test_plugin_with_twin(data):
    section = run_plugin("paths", data=data, twin=True, epochs=1, options={"paths": {"samples": 32}})
    m = section.metrics
    assert m["blocks"] == 9 and m["trained/max_relative_error"] < 1e-5 and m["init/max_relative_error"] < 1e-5
    assert sum(m[f"trained/share/{k}"] for k in range(10)) == pytest.approx(1.0)
    assert 0 <= m["trained/effective_low"] <= m["trained/effective_high"] <= 9
    assert m["twin/single_path_gradient_norm"] > 0
    assert any("plain twin plain20 has one path, of length 9" in f.text for f in section.findings)
    assert len(section.tables) == 2 and section.figures


def test_plugin_on_a_plain_network(data):
    section = run_plugin("paths", model="plain20", data=data, epochs=0)
    assert "has no residual blocks" in section.findings[0].text
