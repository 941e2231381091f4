import pytest
import torch

from resinspect.errors import CheckpointError
from resinspect.models import build_model, load_checkpoint, save_checkpoint

KW = {"in_channels": 1, "num_classes": 10, "image_size": 16}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet20", **KW).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, "resnet20", KW, dataset={"name": "digits"},
                           metrics={"test_accuracy": 0.5})
    return model, path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded, payload = load_checkpoint(path)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), loaded.eval()(x))
    assert payload["arch"] == "resnet20" and payload["dataset"]["name"] == "digits"
    assert payload["metrics"] == {"test_accuracy": 0.5}


def test_checkpoint_loads_with_plain_weights_only_torch_load(saved):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "resinspect-checkpoint"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}/nope.pt: no such file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}: unreadable, the file is truncated"):
        load_checkpoint(path)


def test_foreign_files(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(build_model("resnet20").state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare.pt: not a resinspect checkpoint; it looks like a bare state dict"):
        load_checkpoint(bare)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: unreadable"):
        load_checkpoint(text)
    obj = tmp_path / "obj.pt"
    torch.save({"format": "resinspect-checkpoint", "evil": torch.nn.ReLU()}, obj)
    with pytest.raises(CheckpointError, match="obj.pt: refused to load"):
        load_checkpoint(obj)


def test_mismatched_model(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="does not match the model.*(missing|unexpected) keys"):
        load_checkpoint(path, model=build_model("resnet32", **KW))
    with pytest.raises(CheckpointError, match="shape mismatch: fc.weight"):
        load_checkpoint(path, model=build_model("resnet20", in_channels=1, num_classes=5))


def test_user_factory_is_not_imported_on_the_files_word(tmp_path, monkeypatch):
    (tmp_path / "facmod.py").write_text(
        "from torch import nn\ndef net(in_channels, num_classes):\n    return nn.Linear(in_channels, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("facmod:net", in_channels=4, num_classes=2)
    path = save_checkpoint(tmp_path / "f.pt", model, "facmod:net", {"in_channels": 4, "num_classes": 2})
    with pytest.raises(CheckpointError, match="user factory; name it explicitly"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, allow_factory="facmod:net")
    assert torch.equal(loaded.weight, model.weight)
