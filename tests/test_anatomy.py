import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import UserResNet, hook_count, overridden_forwards
from resinspect.anatomy import NoResidualBlocks, bypass, drop_skip, require_blocks, residual_blocks
from resinspect.errors import UnknownNameError
from resinspect.models import build_model


@pytest.mark.parametrize("name,count", [("resnet20", 9), ("resnet56", 27), ("resnet110", 54),
                                        ("torchvision:resnet18", 8), ("torchvision:resnet50", 16),
                                        ("seed34", 16), ("plain20", 0), ("plain56", 0)])
def test_block_counts(name, count):
    assert len(residual_blocks(build_model(name, 3, 10, 32))) == count


def test_block_details_for_resnet20():
    blocks = residual_blocks(build_model("resnet20"))
    assert [b.name for b in blocks[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [b.index for b in blocks] == list(range(9))
    assert [b.stage for b in blocks] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [b.downsamples for b in blocks] == [False, False, False, True, False, False, True, False, False]
    assert [b.shortcut_kind for b in blocks].count("projection") == 2
    assert blocks[3].shortcut_module == "shortcut"
    assert blocks[0].branch_modules == ["conv1", "bn1", "relu", "conv2", "bn2"]


def test_user_written_residual_model_is_found_without_registration():
    blocks = residual_blocks(UserResNet(depth=3))
    assert [b.name for b in blocks] == ["body.0", "body.1", "body.2"]
    assert all(b.shortcut_kind == "identity" and b.branch_modules == ["f"] for b in blocks)


def test_plain_model_gets_a_clear_error_when_blocks_are_required():
    with pytest.raises(NoResidualBlocks, match="needs residual blocks.*has none"):
        require_blocks(build_model("plain20"), "ablation")


def test_branch_and_shortcut_compute_the_two_paths():
    m = build_model("resnet20").eval()
    b = residual_blocks(m)[3]  # layer2.0: projection shortcut
    x = torch.randn(2, 16, 8, 8)
    blk = m.layer2[0]
    f = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x)))))
    assert torch.equal(b.branch(x), f)
    assert torch.equal(b.shortcut(x), blk.shortcut(x))
    assert torch.allclose(blk(x), F.relu(f + blk.shortcut(x)))


def _direct_forward(model, x, mode_for):
    """resnet forward written out by hand, with a per-block override."""
    x = model.stem(x)
    for stage in (model.layer1, model.layer2, model.layer3):
        for blk in stage:
            f = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x)))))
            mode = mode_for.get(blk)
            x = F.relu(blk.shortcut(x) if mode == "bypass" else f if mode == "drop" else f + blk.shortcut(x))
    return model.fc(torch.flatten(model.pool(x), 1))


def test_switches_equal_a_direct_computation_and_restore_bit_for_bit():
    m = build_model("resnet20").eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        clean = m(x)
        with bypass(m, ["layer1.1", "layer2.0"]):
            lesioned = m(x)
        expected = _direct_forward(m, x, {m.layer1[1]: "bypass", m.layer2[0]: "bypass"})
        assert torch.allclose(lesioned, expected, atol=1e-6)
        assert not torch.allclose(lesioned, clean)
        with drop_skip(m, "layer3.1"):
            dropped = m(x)
        assert torch.allclose(dropped, _direct_forward(m, x, {m.layer3[1]: "drop"}), atol=1e-6)
        assert torch.equal(m(x), clean)
    assert overridden_forwards(m) == [] and hook_count(m) == 0


def test_bypass_does_not_compute_the_branch():
    m = build_model("resnet20").eval()
    calls = []
    handle = m.layer1[1].conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), bypass(m, "layer1.1"):
            m(torch.randn(1, 3, 16, 16))
        assert calls == []
        m(torch.randn(1, 3, 16, 16))
        assert calls == [1]
    finally:
        handle.remove()


def test_restored_after_an_exception():
    m = build_model("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    clean = m(x)
    with pytest.raises(RuntimeError, match="boom"):
        with bypass(m, residual_blocks(m)):
            raise RuntimeError("boom")
    assert torch.equal(m(x), clean)
    assert overridden_forwards(m) == [] and hook_count(m) == 0


def test_nested_switches_on_the_same_block_unwind():
    m = build_model("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    clean = m(x)
    with bypass(m, "layer1.0"):
        outer = m(x)
        with drop_skip(m, "layer1.0"):
            assert not torch.equal(m(x), outer)
        assert torch.equal(m(x), outer)
    assert torch.equal(m(x), clean)


def test_switches_on_torchvision_and_user_models_keep_gradients_working():
    for m, x in ((build_model("torchvision:resnet18", 3, 10, 32), torch.randn(2, 3, 32, 32)),
                 (UserResNet(), torch.randn(2, 1, 8, 8))):
        blocks = residual_blocks(m)
        clean = m(x).detach()
        with bypass(m, blocks[:2]):
            out = m(x)
            out.sum().backward()  # the in-place ReLU after the skip must not break autograd
        assert not torch.allclose(out.detach(), clean)
        assert torch.equal(m(x).detach(), clean) or m.training  # BN in train mode updates stats
        assert overridden_forwards(m) == []


def test_user_block_bypass_is_the_identity():
    m = UserResNet().eval()
    x = torch.randn(2, 8, 6, 6)
    with bypass(m, "body.1"):
        assert torch.equal(m.body[1](x), x)
    with drop_skip(m, "body.1"):
        assert torch.equal(m.body[1](x), m.body[1].f(x))


def test_unknown_block_name():
    with pytest.raises(UnknownNameError, match="layer1.0"):
        with bypass(build_model("resnet20"), "layer9.9"):
            pass


def test_variants_share_compiled_code_but_call_their_own_block():
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8).eval()
    blocks = residual_blocks(model)
    a, b = blocks[1], blocks[2]  # same structure (identity shortcut, 16 channels), different weights
    assert a.variant("branch").__func__ is b.variant("branch").__func__
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        for blk in (a, b):
            m = blk.module
            expected = m.bn2(m.conv2(F.relu(m.bn1(m.conv1(x)))))
            assert torch.allclose(blk.branch(x), expected, atol=1e-6)
        assert not torch.allclose(a.branch(x), b.branch(x))
    # the plain twin still gets a real module per block (it replaces the block in its parent)
    gm = a.graph_module("drop_skip")
    assert isinstance(gm, nn.Module) and sum(p.numel() for p in gm.parameters()) == a.parameters_count()
