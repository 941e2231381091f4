"""timm models (``timm:<name>``, the optional extra): built by timm, weights from a file in timm's layout,
timm's own inference transform, residual sites in timm's transformer blocks, and one line when timm is
missing. Nothing is downloaded: timm's pretrained configs ship with the package."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import write_image_folder
from PIL import Image

import resinspect
from resinspect import residual_blocks
from resinspect.cli import main
from resinspect.errors import ResinspectError

timm = pytest.importorskip("timm")  # installed by the test extra (.ci/run); optional at run time

WNIDS = ["n01440764", "n01443537"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), WNIDS, 2, 60, 70, seed=1)


def test_a_timm_state_dict_keeps_its_head_and_timm_s_own_transform(folder, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)  # timm's layout, 1000 classes
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    result = resinspect.run(model="timm:resnet18", data="imagefolder", data_root=str(folder), weights=str(path),
                            plugins=["summary"], out=tmp_path / "r", device="cpu",
                            tb_skip=["graph", "projector", "layout"])
    assert result.status == "complete", result.results.error
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in result.model.state_dict().items())
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["data"]["num_classes"] == 1000 and data["data"]["image_size"] == 224
    assert "ImageNet ids" in data["data"]["classes"]
    assert "bicubic" in data["data"]["preprocessing"] and "Normalize" in data["data"]["preprocessing"]
    # timm's transform for resnet18, built by hand from its pretrained config: resize 235 bicubic, crop 224
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg("resnet18").to_dict())
    tf = timm.data.create_transform(**cfg)
    by_hand = torch.stack([tf(Image.open(folder / "val" / w / f"{i}.jpg").convert("RGB")) for w in WNIDS
                           for i in range(2)])
    with torch.no_grad():
        expected = (source.eval()(by_hand).argmax(1) == torch.tensor([0, 0, 1, 1])).float().mean().item()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "r" / "tb" / "model"))
    tb.Reload()
    assert tb.Scalars("hparams/test_error")[0].value == pytest.approx(1 - expected)


def test_sites_in_timm_s_transformer_blocks_and_their_optional_arguments():
    model = resinspect.build_model("timm:vit_tiny_patch16_224", 3, 10, 32).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    blocks = residual_blocks(model)
    assert [b.name for b in blocks[:2]] == ["blocks.0.attention", "blocks.0.mlp"]
    assert len(blocks) == 24 and {b.kind for b in blocks} == {"attention", "mlp"}
    assert torch.equal(model(x), reference(x))  # cut into sites, the same operations
    # attention removed from block 0 by hand vs the site bypassed
    blk = reference.blocks[0]
    tokens = reference.patch_embed(x)
    tokens = reference.norm_pre(reference.patch_drop(reference._pos_embed(tokens)))
    by_hand = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    with resinspect.bypass(model, blocks[0]):
        assert torch.allclose(model.blocks[0](tokens), by_hand, atol=1e-6)
    assert torch.equal(model.blocks[0](tokens, attn_mask=None), reference.blocks[0](tokens))
    with pytest.raises(RuntimeError, match="attn_mask"):
        model.blocks[0](tokens, attn_mask=torch.zeros(5, 5))


def test_timm_names_are_checked_and_a_missing_timm_is_one_line(monkeypatch):
    with pytest.raises(ResinspectError, match="unknown timm model 'resnet1800'; did you mean 'timm:resnet18"):
        resinspect.build_model("timm:resnet1800")
    out = CliRunner().invoke(main, ["models"]).output
    assert "timm:<name>" in out and f"timm {timm.__version__}" in out
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ResinspectError, match=r"pip install resinspect\[timm\]"):
        resinspect.build_model("timm:resnet18")
    res = CliRunner().invoke(main, ["run", "--model", "timm:resnet18", "--epochs", "0", "--out", "x"])
    assert res.exit_code != 0 and "pip install resinspect[timm]" in res.output and "Traceback" not in res.output
    assert "pip install resinspect[timm]" in CliRunner().invoke(main, ["models"]).output
