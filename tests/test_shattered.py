"""Plugin shattered: gradient autocorrelation along lines (Balduzzi et al. 2017)."""

import math

import pytest
import torch
from torch import nn

from resinspect.models import build_model
from resinspect.plugins import PluginHost
from resinspect.testing import run_plugin, tiny_data
from resinspect_plugins._shattered import (ToyPlain, ToyResidual, autocorrelation, correlation_matrix,
                                           decay_length, input_gradients, line_points, sequence_autocorrelation,
                                           toy_gradients)


def test_a_linear_model_has_autocorrelation_exactly_one_at_every_distance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    start, end = torch.randn(1, 8, 8), torch.randn(1, 8, 8)
    grads = input_gradients(model, line_points(start, end, 32), cls=3, batch=7)
    curve = autocorrelation(correlation_matrix(grads))
    assert torch.allclose(curve, torch.ones_like(curve), atol=1e-12)
    assert decay_length(curve) is None


def test_independent_gradients_decorrelate_at_once():
    torch.manual_seed(1)
    curve = autocorrelation(correlation_matrix(torch.randn(200, 5000)))
    assert curve[0] == pytest.approx(1.0)
    assert curve[1:].abs().max() < 0.05  # ~1/sqrt(5000) per pair, averaged
    assert decay_length(curve) == pytest.approx(1 / 199)


def test_line_points_and_sequence_autocorrelation():
    pts = line_points(torch.zeros(2), torch.ones(2) * 4, 5)
    assert torch.equal(pts[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    slow = sequence_autocorrelation(torch.sin(torch.linspace(0, math.pi, 100)))
    assert slow[1] > 0.95
    alternating = sequence_autocorrelation(torch.tensor([1.0, -1.0] * 50))
    assert alternating[1] == pytest.approx(-0.99, abs=0.01)


def test_the_papers_toy_residual_gradients_are_brown_plain_ones_white():
    lag = {"plain": [], "res": []}
    for seed in range(3):
        torch.manual_seed(seed)
        lag["plain"].append(float(sequence_autocorrelation(toy_gradients(ToyPlain()))[1]))
        lag["res"].append(float(sequence_autocorrelation(toy_gradients(ToyResidual()))[1]))
    assert max(abs(v) for v in lag["plain"]) < 0.2  # white noise: neighbours uncorrelated
    assert min(lag["res"]) > 0.3  # brown noise: neighbours correlated


def test_the_toys_are_registered_models_and_the_toy_gradient_leaves_the_model_unchanged():
    PluginHost().register_extensions()
    plain, res = build_model("toy-plain24", 1, 1), build_model("toy-resnet50", 1, 1)  # scalar in, scalar out
    assert isinstance(plain, ToyPlain) and isinstance(res, ToyResidual)
    before = {k: v.clone() for k, v in res.state_dict().items()}
    toy_gradients(res)
    assert all(torch.equal(v, before[k]) for k, v in res.state_dict().items())


def test_plugin_with_twin():
    section = run_plugin("shattered", data=tiny_data(train=64, test=32), twin=True, epochs=1,
                         options={"shattered": {"lines": 1, "points": 16, "toy_seeds": 2}})
    m = section.metrics
    for key in ("model/trained/lag1_correlation", "twin/trained/lag1_correlation", "model/init/lag1_correlation",
                "toy/plain24/lag1_correlation", "toy/resnet50/lag1_correlation"):
        assert -1 <= m[key] <= 1, key
    assert m["lines"] == 2 and len(section.figures) == 3
    assert any("plain twin plain20" in f.text for f in section.findings)
