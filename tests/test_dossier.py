"""The per-block dossier: every plugin's per-block columns in one table, and their rank correlations."""

import json

import numpy as np
import pytest

import resinspect
from resinspect import Section
from resinspect.dossier import dossier_section, ranks, spearman
from resinspect.results import Results, validate
from resinspect.testing import tiny_data

BLOCKS = [{"name": f"b{i}", "stage": 1 + i // 2} for i in range(5)]


def test_ranks_average_ties_and_spearman_closed_forms():
    assert ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 3, 4], [10, 40, 90, 160]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    d2 = sum((a - b) ** 2 for a, b in zip(x, y))
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))  # no ties: 1 - 6 sum d^2 / n(n^2-1)
    assert np.isnan(spearman([1, 2], [2, 1])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _section(plugin, **cols):
    s = Section(plugin)
    s.plugin = plugin
    for name, (values, sign) in cols.items():
        s.block_column(name, values, sign=sign)
    return s


def test_columns_are_oriented_so_that_positive_means_agreement():
    cost = {f"b{i}": v for i, v in enumerate([5.0, 1.0, 3.0, 0.5, 2.0])}
    cka = {b: 1 - v / 10 for b, v in cost.items()}  # a block that changes less (high CKA) costs less
    noise = {f"b{i}": v for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0])}
    d = dossier_section(BLOCKS, [_section("ablation", cost=(cost, 1)), _section("similarity", cka=(cka, -1)),
                                 _section("other", noise=(noise, 1))])
    assert d.metrics["spearman/ablation/cost~similarity/cka"] == pytest.approx(1.0)
    assert d.metrics["spearman/ablation/cost~other/noise"] == pytest.approx(spearman(list(cost.values()),
                                                                                    list(noise.values())))
    assert d.metrics["top/ablation/cost"] == "b0" and d.metrics["top/similarity/cka"] == "b0"
    assert d.metrics["top/other/noise"] == "b4"
    table = d.tables[0]
    assert table.columns == ["block", "stage", "cost (ablation)", "cka (similarity; smaller matters more)", "noise (other)"]
    assert table.rows[0] == ["b0", 1, 5.0, 0.5, 1.0]
    texts = " ".join(f.text for f in d.findings)
    assert "Most in agreement: ablation/cost and similarity/cka (rho +1.00)" in texts
    assert "b0 matters most by 2 of 3 measurements" in texts


def test_no_dossier_without_columns_and_a_bad_sign_is_refused():
    assert dossier_section(BLOCKS, [Section("x")]) is None
    assert dossier_section([], [_section("a", c=({"b0": 1.0}, 1))]) is None
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        Section("x").block_column("c", {"b0": 1.0}, sign=2)


def test_missing_blocks_stay_blank_and_twin_sections_are_left_out():
    twin = _section("gradflow", ratio=({"b0": 9.0, "b1": 1.0, "b2": 3.0}, 1))
    twin.role = "twin"
    d = dossier_section(BLOCKS, [_section("a", part=({"b0": 1.0, "b2": 2.0, "b4": 3.0}, 1)), twin])
    assert d.tables[0].columns == ["block", "stage", "part (a)"]
    assert [r[2] for r in d.tables[0].rows] == [1.0, None, 2.0, None, 3.0]


@pytest.fixture(scope="module")
def dossier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dossier") / "run"
    return out, resinspect.run(model="resnet8", data=tiny_data(train=128, test=96), epochs=1, device="cpu", out=out,
                               plugins=["ablation", "activations", "similarity", "gradflow"])


def test_a_run_gathers_every_plugins_block_measurements(dossier_run):
    out, result = dossier_run
    d = next(s for s in result.results.core_sections if s.plugin == "dossier")
    names = [b.name for b in resinspect.residual_blocks(result.model)]
    table = d.tables[0]
    assert [r[0] for r in table.rows] == names
    col = table.columns.index("lesion cost (points) (ablation)")
    m = result.section("ablation").metrics
    assert [r[col] for r in table.rows] == [m[f"lesion/{n}/cost_points"] for n in names]
    ratio = table.columns.index("||F(x)||/||x|| (activations)")
    a = result.section("activations").metrics
    assert [r[ratio] for r in table.rows] == pytest.approx([a[f"block/{n}/branch_ratio"] for n in names])
    cka = [result.section("similarity").metrics[f"block/{n}/cka_in_out"] for n in names]
    costs = [m[f"lesion/{n}/cost_points"] for n in names]
    key = "spearman/ablation/lesion cost (points)~similarity/CKA(input, output)"
    assert d.metrics[key] == pytest.approx(spearman(costs, [-c for c in cka]), nan_ok=True)
    # in results.json (valid against the schema), and read back the same
    raw = json.loads((out / "results.json").read_text())
    assert validate(raw) == []
    back = Results.read(out)
    assert back.metrics()[f"dossier/{key}"] == pytest.approx(d.metrics[key], nan_ok=True)
    sim = next(s for s in back.plugins["similarity"].sections)
    assert sim.block_sign == {"CKA(input, output)": -1} and sim.per_block["CKA(input, output)"] == pytest.approx(
        dict(zip(names, cka)))
    assert "Per-block dossier" in (out / "index.html").read_text()


def test_compare_lines_up_the_dossiers(dossier_run, tmp_path):
    out, result = dossier_run
    other = resinspect.run(model="resnet8", data=tiny_data(train=128, test=96), epochs=0, device="cpu",
                           out=tmp_path / "b", plugins=["ablation"])
    cmp = resinspect.compare([out, tmp_path / "b"])
    col = cmp.blocks["ablation/lesion cost (points)"]
    m0, m1 = result.section("ablation").metrics, other.section("ablation").metrics
    assert col == {n: [m0[f"lesion/{n}/cost_points"], m1[f"lesion/{n}/cost_points"]] for n in col}
    assert cmp.blocks["similarity/CKA(input, output)"]["layer1.0"][1] is None  # not measured in run 2
