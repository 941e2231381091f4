"""Plugins landscape and curvature: closed forms on a quadratic loss, agreement with PyHessian, weights left
bit-identical, both plugins end to end with the plain twin."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from resinspect.testing import make_context, run_plugin, tiny_data
from resinspect_plugins import curvature, landscape
from resinspect_plugins._curvature import HessianOperator, density, hutchinson, top_eigenvalues
from resinspect_plugins._landscape import Surface, filter_normalised_direction, nonconvexity


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=256, test=128, size=8)


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2).mean()


def quadratic(n=200, d=12, seed=0):
    """Linear regression: L(w) = mean((Xw − y)²) is exactly quadratic, with Hessian 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    return model, x, y, 2 * x.T @ x / n


# -- curvature -----------------------------------------------------------------------------------------
def test_top_eigenvalues_of_a_quadratic_loss_are_the_hessians():
    model, x, y, h = quadratic()
    op = HessianOperator(model, [(x, y)], loss_fn=mse)
    found, products = top_eigenvalues(op, 3, steps=12, tol=1e-10, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.eigvalsh(h).flip(0)[:3]
    assert np.allclose(found, exact.numpy(), rtol=1e-4) and products <= 12


def test_trace_of_a_quadratic_loss_within_its_standard_error_and_blocks_add_up():
    model, x, y, h = quadratic()
    op = HessianOperator(model, [(x, y)], loss_fn=mse)
    est = hutchinson(op, 400, generator=torch.Generator().manual_seed(1))
    exact = float(torch.trace(h))
    assert abs(est.mean - exact) <= 2 * est.stderr
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v: the reported standard error estimates it
    theory = math.sqrt(2 * (float((h ** 2).sum()) - float((h.diagonal() ** 2).sum())) / 400)
    assert est.stderr == pytest.approx(theory, rel=0.25)


def test_per_block_traces_add_up_to_the_whole_trace(data):
    ctx = make_context("resnet20", data=data)
    net = ctx.model.eval()
    x, y = next(iter(ctx.train_loader))
    op = HessianOperator(net, [(x[:32], y[:32])])
    groups = curvature.block_groups(net, [b.name for b in ctx.blocks("model")])
    est = hutchinson(op, 4, groups, generator=torch.Generator().manual_seed(0))
    assert set(est.groups) == set(groups) | {"other"}
    assert sum(m for m, _ in est.groups.values()) == pytest.approx(est.mean, rel=1e-9, abs=1e-9)
    assert all(len(idx) > 0 for idx in groups.values())


def test_density_of_a_quadratic_loss_puts_its_mass_on_the_eigenvalues():
    model, x, y, h = quadratic(d=6)
    op = HessianOperator(model, [(x, y)], loss_fn=mse)
    grid, dens = density(op, steps=6, runs=4, width=0.01, points=20000, generator=torch.Generator().manual_seed(0))
    mass = float(torch.trapezoid(dens, grid))
    assert mass == pytest.approx(1.0, abs=1e-3)  # the weights of each run sum to 1
    peaks = grid[1:-1][(dens[1:-1] > dens[:-2]) & (dens[1:-1] > dens[2:]) & (dens[1:-1] > 0.5)].numpy()
    for ev in torch.linalg.eigvalsh(h).numpy():
        assert np.abs(peaks - ev).min() < 0.01 + 1e-3


@pytest.mark.filterwarnings("ignore:Using backward")  # PyHessian builds its graph with backward(create_graph=True)
def test_top_eigenvalue_and_trace_agree_with_pyhessian_on_the_same_batch(data):
    pyhessian = pytest.importorskip("pyhessian")
    ctx = make_context("resnet20", data=data)
    net = ctx.model.eval()
    x, y = next(iter(ctx.train_loader))
    x, y = x[:32], y[:32]
    op = HessianOperator(net, [(x, y)])
    ours, _ = top_eigenvalues(op, 1, tol=1e-4, generator=torch.Generator().manual_seed(0))
    ours_trace = hutchinson(op, 40, generator=torch.Generator().manual_seed(1))
    op.release()
    torch.manual_seed(2)
    ref = pyhessian.hessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    theirs, _ = ref.eigenvalues(top_n=1, tol=1e-4, maxIter=300)
    samples = ref.trace(maxIter=40, tol=1e-12)
    net.zero_grad(set_to_none=True)
    assert ours[0] == pytest.approx(theirs[0], rel=0.02)
    their_mean, their_se = float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
    # two independent Monte-Carlo estimates of one number: within 3 combined standard errors (99.7%)
    assert abs(ours_trace.mean - their_mean) <= 3 * math.hypot(ours_trace.stderr, their_se)


# -- landscape -----------------------------------------------------------------------------------------
def test_filter_normalised_directions_match_each_filter_and_skip_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    params = list(net.parameters())
    d = filter_normalised_direction(params, torch.Generator().manual_seed(0))
    for p, dp in zip(params, d):
        if p.dim() <= 1:
            assert not dp.any()
        else:
            assert torch.allclose(dp.reshape(len(dp), -1).norm(dim=1), p.detach().reshape(len(p), -1).norm(dim=1),
                                  rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7])
def test_landscape_of_a_quadratic_loss_equals_the_closed_form(chunk):
    """L(w + a·d₁ + b·d₂) = L(w) + gᵀδ + ½ δᵀHδ exactly, for δ = a·d₁ + b·d₂ (one at a time, and vectorised)."""
    model, x, y, h = quadratic()
    w = model.weight.detach().flatten().clone()
    params = [model.weight]
    gen = torch.Generator().manual_seed(3)
    d1, d2 = filter_normalised_direction(params, gen), filter_normalised_direction(params, gen)
    coords = torch.cartesian_prod(torch.linspace(-1, 1, 5, dtype=torch.float64), torch.linspace(-1, 1, 5, dtype=torch.float64))
    surface = Surface(model, [(x, y)], [d1, d2], chunk=chunk, loss_fn=lambda out, t: mse(out, t) * len(t))
    got = surface.evaluate(coords).loss
    resid = x @ w - y
    loss0, grad = float((resid ** 2).mean()), 2 * x.T @ resid / len(y)
    for (a, b), value in zip(coords, got):
        delta = a * d1[0].flatten() + b * d2[0].flatten()
        assert float(value) == pytest.approx(loss0 + float(grad @ delta) + 0.5 * float(delta @ h @ delta), rel=1e-10)
    assert torch.equal(model.weight.detach().flatten(), w)


def test_nonconvexity_of_a_bowl_and_of_a_saddle():
    xs = torch.linspace(-1, 1, 9, dtype=torch.float64)
    a, b = torch.meshgrid(xs, xs, indexing="ij")
    assert nonconvexity(a ** 2 + b ** 2) == 0.0
    assert nonconvexity(a ** 2 - b ** 2) == pytest.approx(0.5)


def test_weights_are_bit_identical_after_both_plugins_also_after_a_failure(data, monkeypatch):
    ctx = make_context("resnet20", data=data)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    opts = {"resolution": 3, "resolution_1d": 3, "span": 1.0, "samples": 32, "chunk": 4}
    batches = landscape._subset(ctx, 32)
    landscape.measure(ctx.model, batches, opts, 0)
    copts = {"top_k": 2, "max_iter": 5, "tol": 1e-3, "probes": 2, "density": True, "density_steps": 4}
    curvature.measure(ctx.model, curvature._subset(ctx, 32), [b.name for b in ctx.blocks("model")], copts, 0)

    def same():
        return all(torch.equal(v, before[k]) for k, v in ctx.model.state_dict().items())

    assert same() and all(p.grad is None for p in ctx.model.parameters())

    def broken(self, *a, **k):  # fails after the weights were moved to a grid point
        with torch.no_grad():
            for p in self.params:
                p.add_(1.0)
        raise RuntimeError("forced")

    monkeypatch.setattr(Surface, "_batched", broken)
    monkeypatch.setattr(Surface, "_stepped", broken)
    with pytest.raises(RuntimeError, match="forced"):
        landscape.measure(ctx.model, batches, {**opts, "chunk": 1}, 0)
    assert same()
    monkeypatch.setattr(HessianOperator, "__call__", lambda self, v: (_ for _ in ()).throw(RuntimeError("forced")))
    with pytest.raises(RuntimeError, match="forced"):
        curvature.measure(ctx.model, curvature._subset(ctx, 32), [], copts, 0)
    assert same()


def test_landscape_plugin_with_twin(data):
    s = run_plugin("landscape", "resnet20", data=data, epochs=1, twin=True,
                   options={"landscape": {"resolution": 5, "resolution_1d": 7, "samples": 64}})
    m = s.metrics
    assert m["grid_points"] == 25 and m["samples"] == 64
    assert 0 <= m["model/nonconvexity"] <= 1 and "twin/loss_rise_at_0.5" in m
    assert len(s.figures) == 3 and any("Residual vs plain" in f.text for f in s.findings)


def test_curvature_plugin_with_twin(data):
    s = run_plugin("curvature", "resnet20", data=data, epochs=1, twin=True,
                   options={"curvature": {"samples": 64, "probes": 4, "top_k": 2, "max_iter": 20}})
    m = s.metrics
    assert m["model/eigenvalue_1"] >= m["model/eigenvalue_2"] and "twin/eigenvalue_1" in m
    blocks = [k for k in m if k.startswith("model/block/") and not k.endswith("other/trace")]
    assert len(blocks) == 9
    total = sum(v for k, v in m.items() if k.startswith("model/block/"))
    assert total == pytest.approx(m["model/trace"], rel=1e-6, abs=1e-6)
    assert any("plain twin" in f.text for f in s.findings)
