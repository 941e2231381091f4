"""Plugins similarity (CKA) and spectra (weight spectra): closed-form invariances, a known power law, and
agreement with the peers torch-cka and weightwatcher on the same layers."""

import copy
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision

from helpers import UserResNet
from resinspect.models import build_model
from resinspect.testing import make_context, run_plugin, tiny_data
from resinspect_plugins import similarity, spectra
from resinspect_plugins._similarity import HSICSums, cka_pair, u_centred_gram
from resinspect_plugins._spectra import eigenvalues, fit_power_law, spectrum


@pytest.fixture(scope="module")
def data():
    return tiny_data(train=256, test=128, size=8)


# -- CKA -------------------------------------------------------------------------------------------------
def test_cka_of_a_layer_with_itself_a_rotation_and_a_rescaling_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert cka_pair(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_pair(x, x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal rotation
    assert cka_pair(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert cka_pair(x, x * torch.linspace(0.1, 3, 40, dtype=torch.float64)) < 0.99  # anisotropic: not invariant


def test_independent_features_give_cka_near_zero_without_bias():
    """The unbiased estimator: CKA of independent 200-wide Gaussian features over 8 batches of 64 is centred on
    0 (the biased estimator gives about 0.2 here). Over 20 seeds, |mean| < 0.01 and every value < 0.05."""
    values = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        sums = HSICSums(2)
        for _ in range(8):
            a = torch.randn(64, 200, generator=g, dtype=torch.float64)
            b = torch.randn(64, 200, generator=g, dtype=torch.float64)
            sums.add([u_centred_gram(a), u_centred_gram(b)])
        values.append(float(sums.cka()[0, 1]))
    assert abs(np.mean(values)) < 0.01 and max(abs(v) for v in values) < 0.05


def test_hsic_equals_the_closed_form_unbiased_estimator():
    """Song et al. (2012), eq. (5), written out: tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1, over n(n−3)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 9, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    n, one = 12, torch.ones(12, dtype=torch.float64)
    expected = (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    assert float(u_centred_gram(x) @ u_centred_gram(y)) / (n * (n - 3)) == pytest.approx(float(expected), rel=1e-12)


def test_batches_smaller_than_four_are_refused_by_the_estimator():
    with pytest.raises(ValueError, match="at least 4"):
        u_centred_gram(torch.randn(3, 5))


def torch_cka_matrix(model, layers, batches, dtype=torch.float64):
    """torch-cka's unbiased minibatch CKA between the named layers of ``model``, on ``batches``. In float64:
    its float32 arithmetic (the trace of K·L on large Gram matrices) carries rounding errors of about 1e-3
    of its own, which is not what the comparison is about."""
    torch_cka = pytest.importorskip("torch_cka")

    class Batches(list):
        dataset = "test images"

    net = copy.deepcopy(model).to(dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch-cka makes its ones-vectors and sums in the default dtype
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = torch_cka.CKA(net, copy.deepcopy(net), "a", "b", layers, layers)
            ref.compare(Batches((x.to(dtype), y) for x, y in batches))
    finally:
        torch.set_default_dtype(old)
    return ref.hsic_matrix.numpy()


def test_block_cka_equals_torch_cka_on_the_same_layers_and_batches(data):
    ctx = make_context("resnet20", data=data)
    ctx.model.eval()
    measured = similarity.measure(ctx, 0, branches=False)
    layers = [n for role, n in measured.order if role == "model"]
    assert layers[0] == "stem" and len(layers) == 10  # the stem (block 0's input) and the 9 block outputs
    ref = torch_cka_matrix(ctx.model, layers, list(ctx.test_loader))
    assert np.abs(measured.cka.numpy() - ref).max() < 1e-4


def test_block_structure_runs_are_bright_squares():
    m = np.full((6, 6), 0.5)
    np.fill_diagonal(m, 1.0)
    m[1:4, 1:4] = 0.97  # layers 1..3 alike
    np.fill_diagonal(m, 1.0)
    assert similarity.block_structure(m, 0.95) == [(1, 3)]
    m[1, 3] = m[3, 1] = 0.9  # neighbours alike, but not every pair: no square
    assert similarity.block_structure(m, 0.95) == []


def test_similarity_plugin_with_twin(data):
    s = run_plugin("similarity", "resnet20", data=data, epochs=1, twin=True)
    m = s.metrics
    assert m["images"] == 128 and 0 < m["median_cka_in_out"] <= 1 and "twin_median_cka_in_out" in m
    assert all(0 <= m[f"block/{b}/cka_in_out"] <= 1 + 1e-9 for b in ("layer1.0", "layer3.2"))
    assert len(s.figures) == 2 and any("CKA between block outputs" in t.title for t in s.tables)


def test_similarity_sets_lesion_costs_beside_its_numbers_when_ablation_ran(tmp_path, data):
    import resinspect
    # similarity is listed first, but runs after ablation (trylast) and reads its section
    result = resinspect.run(model="resnet20", data=data, plugins=["similarity", "ablation"], epochs=1,
                            out=tmp_path / "r", device="cpu", options={"ablation": {"pair_blocks": 0}})
    s = result.section("similarity")
    assert s.status == "ok" and -1 <= s.metrics["spearman_change_vs_lesion_cost"] <= 1
    table = next(t for t in s.tables if t.title.startswith("How much"))
    ablation = result.section("ablation")
    assert table.rows[0][-1] == ablation.metrics["lesion/layer1.0/cost_points"]


@pytest.mark.parametrize("model", ["plain20", "torchvision:resnet18", UserResNet])
def test_similarity_on_other_models(model, data):
    net = model() if callable(model) else model
    s = run_plugin("similarity", net, data=data, epochs=0, options={"similarity": {"images": 64}})
    assert s.metrics["images"] == 64 and s.tables and s.figures


# -- spectra ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_alpha_is_recovered_from_a_known_power_law(alpha):
    """Eigenvalues drawn from p(λ) ∝ λ^(−α), λ ≥ 1 (inverse CDF), under a bulk of small ones: within 0.1."""
    g = np.random.default_rng(int(alpha * 10))
    tail = (1 - g.random(3000)) ** (-1 / (alpha - 1))
    bulk = g.uniform(0.01, 0.5, 1000)
    fit = fit_power_law(torch.tensor(np.concatenate([bulk, tail])))
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    assert 0.5 < fit.xmin < 2.5 and fit.n_tail > 1500


def test_eigenvalues_of_a_constructed_matrix_and_the_convolution_slices():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    s = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)
    w = u[:, :20] @ torch.diag(s) @ v.T
    evals, N, M, rf = eigenvalues(w)
    assert (N, M, rf) == (30, 20, 1) and torch.allclose(evals, (s ** 2).sort().values, atol=1e-10)
    conv = torch.zeros(30, 20, 3, 3, dtype=torch.float64)
    conv[:, :, 1, 2] = w  # one kernel position carries w, the other eight are zero
    evals, N, M, rf = eigenvalues(conv)
    assert rf == 9 and len(evals) == 180
    assert torch.allclose(evals[-20:], (s ** 2 / 2).sort().values, atol=1e-10)  # WeightWatcher's 1/√2 per slice


def _ww_frame(model):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze()


@pytest.mark.parametrize("name", ["torchvision:resnet18", "resnet20"])
def test_alpha_and_stable_rank_agree_with_weightwatcher_on_every_layer(name, capsys):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if name.startswith("torchvision") else build_model(name)
    frame = _ww_frame(model)
    ours, skipped = spectra.analyse(model)
    assert len(ours) == len(frame) and not skipped
    for sp, (_, row) in zip(ours, frame.iterrows()):
        assert sp.num_evals == row.num_evals
        assert sp.alpha == pytest.approx(row.alpha, abs=0.05), sp.name
        assert sp.stable_rank == pytest.approx(row.stable_rank, rel=0.01), sp.name
        assert sp.log_spectral_norm == pytest.approx(row.log_spectral_norm, abs=1e-6), sp.name
    exact, _ = spectra.analyse(model, precision="float64")  # float64 eigenvalues: the same numbers
    assert max(abs(sp.alpha - row.alpha) for sp, (_, row) in zip(exact, frame.iterrows())) < 1e-6


def test_small_layers_are_left_out_as_weightwatcher_leaves_them():
    sp, why = spectrum("tiny", torch.randn(3, 2))
    assert sp is None and "fewer than 8" in why


@pytest.mark.parametrize("model,twin", [("resnet20", True), ("plain20", False), ("torchvision:resnet18", False),
                                        (UserResNet, False)])
def test_spectra_plugin_on_models(model, twin, data):
    net = model() if callable(model) else model
    s = run_plugin("spectra", net, data=data, epochs=1, twin=twin)
    m = s.metrics
    assert m["model/trained/layers"] >= 4 and math.isfinite(m["model/trained/median_alpha"])
    assert "model/init/median_alpha" in m and m["model/init/median_alpha"] != m["model/trained/median_alpha"]
    if twin:
        assert "twin/trained/median_alpha" in m and any("by depth" in f.text for f in s.findings)
    assert len(s.figures) == 2


def test_the_pruned_cut_off_search_finds_the_exhaustive_minimum():
    """The bound-and-prune KS search against every candidate evaluated on every eigenvalue."""
    from resinspect_plugins._spectra import _ks_distances, _ks_exact
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        x = (torch.rand(900 + 300 * trial, generator=g, dtype=torch.float64) + 1e-3) ** -(1 + trial / 3)
        x = x.sort().values
        logx = x.log()
        suffix = logx.flip(0).cumsum(0).flip(0)
        n = (len(x) - torch.arange(len(x) - 1)).double()
        alpha = 1 + n / (suffix[:-1] - n * logx[:-1])
        full = _ks_exact(logx, alpha, n, torch.arange(len(alpha)))
        fast = _ks_distances(logx, alpha, n)
        assert int(torch.argmin(fast)) == int(torch.argmin(full))
        assert float(fast.min()) == float(full.min())
        assert (fast <= full + 1e-15).all()  # every entry is the exact distance or a lower bound of it
