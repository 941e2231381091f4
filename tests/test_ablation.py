import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import UserResNet
from resinspect.anatomy import residual_blocks
from resinspect.testing import TwoBlockNet, hook_count, make_context, overridden_forwards, run_plugin, tiny_data
from resinspect_plugins import ablation
from resinspect_plugins._lesion import Lesion, lesion_sweep


def _batches(x, y, bs=7):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def test_two_block_lesions_equal_the_closed_form():
    a, b = 0.5, -0.25
    net = TwoBlockNet(in_features=4, num_classes=2, a=a, b=b).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 2, (30,), generator=g)
    H = net.head.weight
    blocks = residual_blocks(net)
    assert [bl.name for bl in blocks] == ["b1", "b2"]
    lesions = [Lesion("bypass", (0,)), Lesion("bypass", (1,)), Lesion("drop_skip", (0,)), Lesion("bypass", (0, 1))]
    clean, stats = lesion_sweep(net, _batches(x, y), blocks, lesions)
    expected_logits = {
        "clean": (1 + a) * (1 + b) * x @ H.T,
        lesions[0]: (1 + b) * x @ H.T,
        lesions[1]: (1 + a) * x @ H.T,
        lesions[2]: a * (1 + b) * x @ H.T,
        lesions[3]: x @ H.T,
    }
    for key, s in [("clean", clean)] + list(zip(lesions, stats)):
        logits = expected_logits[key]
        assert s.count == 30
        assert s.correct == int((logits.argmax(1) == y).sum())
        assert s.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.fixture(scope="module")
def trained_ctx():
    ctx = make_context("resnet20", data=tiny_data(train=256, test=96))
    ctx.model.train()
    opt = torch.optim.Adam(ctx.model.parameters(), 1e-2)
    for x, y in ctx.train_loader:
        opt.zero_grad()
        F.cross_entropy(ctx.model(x), y).backward()
        opt.step()
    ctx.model.eval()
    return ctx


def test_fast_and_naive_sweeps_agree_exactly(trained_ctx):
    model = trained_ctx.model
    blocks = residual_blocks(model)
    lesions = ([Lesion("bypass", (i,)) for i in range(9)] + [Lesion("drop_skip", (i,)) for i in range(9)]
               + [Lesion("bypass", (2, 5, 7)), Lesion("bypass", (0, 8))])
    batches = list(trained_ctx.test_batches(96))
    fast = lesion_sweep(model, batches, blocks, lesions, fast=True)
    naive = lesion_sweep(model, batches, blocks, lesions, fast=False)
    assert fast == naive
    assert len({s.correct for s in fast[1]}) > 3  # the lesions really differ


def test_model_is_restored_exactly(trained_ctx):
    model = trained_ctx.model
    x = next(trained_ctx.test_batches(16))[0]
    before_out = model(x).detach()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    trained_ctx.plugin_options = {"ablation": {"samples": 48, "k_max": 3, "subsets": 2, "skip_removal": True,
                                               "bn_recalibrate": True, "bn_batches": 2, "critical_points": 5.0,
                                               "fast": True, "pair_blocks": 4, "independent_points": 1.0,
                                               "layers": True}}
    section = ablation.resinspect_analyze(ctx=trained_ctx)
    assert section.metrics["blocks"] == 9 and section.metrics["images"] == 48
    assert not model.training
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x).detach(), before_out)
    assert hook_count(model) == 0 and overridden_forwards(model) == []
    assert "lesion_bn/layer1.0/accuracy" in section.metrics


@pytest.mark.parametrize("model", ["resnet20", "torchvision:resnet18", UserResNet])
def test_runs_end_to_end(model, tmp_path):
    m = model(in_channels=1, num_classes=10) if callable(model) and not isinstance(model, str) else model
    section = run_plugin("ablation", model=m, data=tiny_data(train=128, test=64), epochs=1, out=tmp_path,
                         options={"ablation": {"k_max": 2, "subsets": 2}})
    n = section.metrics["blocks"]
    assert n == {"resnet20": 9, "torchvision:resnet18": 8}.get(model, 3)
    assert 0 <= section.metrics["clean_accuracy"] <= 1
    assert len(section.tables[0].rows) == n
    assert {f.title for f in section.figures} >= {"Single-block lesions", "Bypassing k random blocks"}
    model_obj = section.run_result.model
    assert hook_count(model_obj) == 0 and overridden_forwards(model_obj) == []


def test_plain_model_has_nothing_to_ablate(tmp_path):
    section = run_plugin("ablation", model="plain20", data=tiny_data(train=64, test=32), epochs=0, out=tmp_path)
    assert section.metrics["blocks"] == 0
    assert "Nothing to ablate" in section.findings[0].text


def test_plain_twin_comparison_appears_with_a_twin(tmp_path):
    section = run_plugin("ablation", model="resnet20", twin=True, data=tiny_data(train=128, test=64), epochs=1,
                         out=tmp_path, options={"ablation": {"k_max": 0, "skip_removal": False}})
    twin_table = [t for t in section.tables if t.title.startswith("Plain twin (plain20)")]
    # the 7 layer pairs of plain20 whose input and output shapes match (not the two downsampling ones)
    assert len(twin_table) == 1 and len(twin_table[0].rows) == 7
    assert any(f.text.startswith("Residual vs plain") for f in section.findings)
    assert "Residual vs plain" in {f.title for f in section.figures}
    twin = section.run_result.twin
    assert overridden_forwards(twin) == [] and hook_count(twin) == 0


def test_identity_lesion_of_a_plain_pair_is_the_identity():
    from resinspect_plugins._lesion import identity_replaced
    twin = make_context("plain20").model
    x = torch.randn(2, 16, 8, 8)
    with identity_replaced([twin.layer1[1]]):
        assert torch.equal(twin.layer1[1](x), x)
    assert not torch.equal(twin.layer1[1](x), x)


def test_pairwise_lesions_match_bypassing_the_two_blocks_by_hand():
    import resinspect
    from torch.utils.data import DataLoader
    from resinspect.training import evaluate

    data = tiny_data(train=128, test=64)
    section = run_plugin("ablation", data=data, epochs=1,
                         options={"ablation": {"pair_blocks": 3, "k_max": 0, "skip_removal": False,
                                               "bn_recalibrate": False}})
    model = section.run_result.model
    blocks = [b for b in resinspect.residual_blocks(model) if not b.downsamples][:3]
    loader = DataLoader(data.test, batch_size=64)
    cpu = torch.device("cpu")
    clean = evaluate(model, loader, cpu)["accuracy"]

    def cost(chosen):
        with resinspect.bypass(model, chosen):
            return (clean - evaluate(model, loader, cpu)["accuracy"]) * 100

    table = next(t for t in section.tables if t.title.startswith("Pairwise lesions"))
    assert section.metrics["pairs"] == 3 and len(table.rows) == 3
    for a_name, b_name, pair_cost, singles, interaction in table.rows:
        a, b = (next(x for x in blocks if x.name == n) for n in (a_name, b_name))
        assert pair_cost == pytest.approx(cost([a, b]), abs=1e-9)
        assert singles == pytest.approx(cost([a]) + cost([b]), abs=1e-9)
        assert interaction == pytest.approx(pair_cost - singles, abs=1e-9)
    assert any("Removing two blocks costs a median" in f.text for f in section.findings)
