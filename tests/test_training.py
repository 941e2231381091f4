import pytest
import torch

from resinspect.data import make_loaders
from resinspect.errors import TrainingDiverged
from resinspect.models import build_model
from resinspect.training import TrainConfig, evaluate, resolve_device, train_model

CPU = torch.device("cpu")


class Recorder:
    """A hook caller that records calls, like the plugin host would dispatch them."""

    def __init__(self, hooks=("resinspect_train_start", "resinspect_after_backward", "resinspect_epoch_end",
                              "resinspect_train_end")):
        self.hooks, self.calls = set(hooks), []

    def has(self, hook):
        return hook in self.hooks

    def call(self, hook, **kwargs):
        self.calls.append((hook, kwargs))
        return []


def _train(name, data, cfg, hooks=None):
    torch.manual_seed(cfg.seed)
    model = build_model(name, data.in_channels, data.num_classes, data.image_size)
    train, test = make_loaders(data, cfg.batch_size, cfg.seed)
    return model, train_model(model, train, test, cfg, CPU, hooks=hooks)


def test_short_resnet20_run_on_digits_is_clearly_above_chance(digits):
    _, history = _train("resnet20", digits, TrainConfig(epochs=2))
    assert history.epochs[-1]["test_accuracy"] > 0.8  # chance is 0.1
    assert len(history.step_losses) == 2 * 22
    assert history.step_losses[-1] < history.step_losses[0]


def test_same_seed_same_numbers(digits8):
    cfg = TrainConfig(epochs=1, batch_size=128, seed=3)
    m1, h1 = _train("resnet20", digits8, cfg)
    m2, h2 = _train("resnet20", digits8, cfg)
    assert h1.step_losses == h2.step_losses
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_sgd_step_schedule_and_evaluate(digits8):
    cfg = TrainConfig(epochs=2, optimizer="sgd", lr=0.05, schedule="step", step_size=1, gamma=0.5)
    model, h = _train("resnet20", digits8, cfg)
    assert [e["lr"] for e in h.epochs] == [0.025, 0.0125]
    _, test = make_loaders(digits8, 64, 0)
    assert evaluate(model, test, CPU)["accuracy"] == pytest.approx(h.epochs[-1]["test_accuracy"])


def test_twin_sees_the_same_batches_in_the_same_order(digits8):
    def batches(name):
        seen = []

        class Spy(Recorder):
            def call(self, hook, **kwargs):
                pass

        torch.manual_seed(0)
        model = build_model(name, 1, 10, 8)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].sum().item()) if m.training else None)
        train, test = make_loaders(digits8, 100, 0)
        train_model(model, train, test, TrainConfig(epochs=2), CPU, hooks=Spy())
        return seen

    assert batches("resnet20") == batches("plain20")


def test_hooks_are_called_at_the_documented_points(digits8):
    rec = Recorder()
    cfg = TrainConfig(epochs=2, batch_size=700)
    _train("resnet20", digits8, cfg, hooks=rec)
    names = [c[0] for c in rec.calls]
    assert names == (["resinspect_train_start"] + ["resinspect_after_backward"] * 2 + ["resinspect_epoch_end"]
                     + ["resinspect_after_backward"] * 2 + ["resinspect_epoch_end", "resinspect_train_end"])
    step = rec.calls[1][1]["step"]
    assert step.role == "model" and step.step == 0 and step.loss.requires_grad is False
    epoch = rec.calls[3][1]["epoch"]
    assert epoch.epoch == 1 and 0 <= epoch.metrics["test_accuracy"] <= 1


def test_gradients_exist_and_weights_are_old_after_backward(digits8):
    seen = {}

    class Check(Recorder):
        def call(self, hook, **kwargs):
            if hook == "resinspect_after_backward" and "grad" not in seen:
                m = kwargs["step"].model
                seen["grad"] = all(p.grad is not None for p in m.parameters())
                seen["w"] = m.fc.weight.detach().clone()

    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8)
    w0 = model.fc.weight.detach().clone()
    train, test = make_loaders(digits8, 700, 0)
    train_model(model, train, test, TrainConfig(epochs=1), CPU, hooks=Check())
    assert seen["grad"] and torch.equal(seen["w"], w0)


def test_no_hook_is_called_when_nobody_listens(digits8):
    class Nobody(Recorder):
        def call(self, hook, **kwargs):
            raise AssertionError(f"{hook} called although nobody implements it")

    _train("resnet20", digits8, TrainConfig(epochs=1, batch_size=700), hooks=Nobody(hooks=()))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_weights(digits8):
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, 8)
    train, test = make_loaders(digits8, 700, 0)
    good = {}

    def poison(m, metrics):
        good.update({k: v.clone() for k, v in m.state_dict().items()})
        with torch.no_grad():
            m.fc.bias.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2, step 1.*the weights of epoch 1, the last good one"):
        train_model(model, train, test, TrainConfig(epochs=3), CPU, on_epoch_end=poison)
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())


def test_bad_config_and_device():
    with pytest.raises(ValueError, match="optimizer must be"):
        TrainConfig(optimizer="lbfgs").validate()
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_eval_mode_restores_each_submodule_exactly():
    from resinspect.training import eval_mode

    model = build_model("resnet20")
    model.train()
    model.layer2.eval()  # mixed modes, e.g. a frozen stage
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.layer1.training and not model.layer2.training
    assert not any(m.training for m in model.layer2.modules())
