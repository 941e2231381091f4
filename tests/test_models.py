import pytest
import torch

from resinspect.errors import UnknownNameError
from resinspect.models import build_model, model_names, twin_name

# He et al. 2016, Table 6: #params of the CIFAR-10 ResNets (3 input channels, 10 classes).
PAPER_PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
                "resnet110": 1.7e6}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,expected", PAPER_PARAMS.items())
def test_parameter_counts_match_the_paper(name, expected):
    count = n_params(build_model(name, in_channels=3, num_classes=10))
    assert abs(count - expected) / expected < 0.03, count


@pytest.mark.parametrize("depth", [20, 56])
def test_plain_twin_has_the_same_layers_without_shortcuts(depth):
    res, plain = build_model(f"resnet{depth}"), build_model(f"plain{depth}")
    res_keys = {k for k in res.state_dict() if ".shortcut." not in k}
    assert res_keys == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert v.shape == res.state_dict()[k].shape
    assert twin_name(f"resnet{depth}") == f"plain{depth}"


def test_seed_network_runs_on_28x28_single_channel():
    m = build_model("seed34", in_channels=1, num_classes=10)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    stages = [len(getattr(m, f"layer{i}")) for i in range(1, 5)]
    assert stages == [3, 4, 6, 3]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("in_channels,size", [(1, 16), (3, 32), (3, 96)])
def test_torchvision_models_are_adapted(arch, in_channels, size):
    m = build_model(f"torchvision:{arch}", in_channels=in_channels, num_classes=7, image_size=size).eval()
    assert m(torch.randn(2, in_channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", [n for n in model_names() if not n.startswith("torchvision:")
                                  and n not in ("resnet110", "plain110")])
def test_every_registered_model_does_forward_and_backward(name):
    from resinspect.models.registry import MODELS

    m = build_model(name, in_channels=1, num_classes=4, image_size=16)
    language = MODELS[name].task == "next-token"  # token ids in, logits at every position out
    out = m(torch.randint(0, 4, (2, 16)) if language else torch.randn(2, 1, 16, 16))
    out.sum().backward()
    assert out.shape == ((2, 16, 4) if language else (2, 4))
    assert all(p.grad is not None for p in m.parameters())


def test_unknown_model_lists_valid_names_and_closest():
    with pytest.raises(UnknownNameError) as e:
        build_model("resnet21")
    msg = str(e.value)
    assert "resnet21" in msg and "did you mean 'resnet20'" in msg and "plain56" in msg


def test_user_factory_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def tiny(in_channels, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def broken():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("mymodels:tiny", in_channels=1, num_classes=5)
    assert m(torch.randn(2, 1, 4, 4)).shape == (2, 5)
    with pytest.raises(TypeError, match="mymodels:broken.*not a torch.nn.Module"):
        build_model("mymodels:broken")
    with pytest.raises(ValueError, match="no callable 'nothing'"):
        build_model("mymodels:nothing")
    with pytest.raises(UnknownNameError):
        build_model("no_such_module_xyz:f")
