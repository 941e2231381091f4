"""One factory for every model name: ``build_model(name, in_channels, num_classes)``.

Names: the CIFAR ResNets ``resnet20 … resnet110`` and their plain twins
``plain20 … plain110``; ``seed34`` / ``plainseed34`` (the origin document's
[3,4,6,3] network); ``torchvision:<builder>`` for every classification model of
torchvision (ResNet, ResNeXt, Wide ResNet, RegNet, MobileNet, EfficientNet,
ConvNeXt, ViT, Swin, MaxViT …); ``timm:<name>`` for any of timm's models (timm is an optional extra,
imported only then); ``hf:<folder or hub id>`` for a Hugging Face causal language model (transformers is an
optional extra too; see :mod:`resinspect.models.hf`); and any user factory written ``package.module:function``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ResinspectError, UnknownNameError, closest_match
from .resnet import ResNet

__all__ = [
    "ModelSpec",
    "MODELS",
    "ModelRegistry",
    "build_model",
    "twin_name",
    "model_names",
    "plain_twin_of",
    "remove_skips",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    factory: Callable[..., nn.Module]
    twin: str | None = None
    source: str = "resinspect"
    task: str = "classification"  # or "next-token": a language model (token ids in, (B, T, V) logits out)


def _cifar(n: int, residual: bool) -> Callable[..., nn.Module]:
    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
        return ResNet((n, n, n), (16, 32, 64), in_channels, num_classes, residual=residual)

    return factory


def _seed(residual: bool) -> Callable[..., nn.Module]:
    def factory(in_channels: int = 1, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
        return ResNet((3, 4, 6, 3), (16, 32, 64, 128), in_channels, num_classes, residual=residual)

    return factory


def _torchvision(arch: str) -> Callable[..., nn.Module]:
    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
        import torchvision.models as tvm

        model = tvm.get_model(arch, weights=None, num_classes=num_classes)
        small = image_size is not None and image_size < 64
        if isinstance(model, tvm.ResNet) and (in_channels != 3 or small):
            # Small images (digits, shapes, CIFAR) lose everything to the 7×7/2 stem and the
            # max-pool; use the usual CIFAR adaptation: a 3×3 stride-1 stem and no max-pool.
            k, s, p = (3, 1, 1) if small else (7, 2, 3)
            model.conv1 = nn.Conv2d(in_channels, 64, k, stride=s, padding=p, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            if small:
                model.maxpool = nn.Identity()
        elif in_channels != 3:
            _adapt_first_conv(model, in_channels)
        return model

    return factory


TIMM_HINT = "timm models need the optional timm package: pip install resinspect[timm]"


def require_timm() -> Any:
    """timm, imported on first use (an optional extra); one line with the install command when missing."""
    try:
        import timm
    except ImportError:
        raise ResinspectError(TIMM_HINT) from None
    return timm


def _timm(arch: str) -> Callable[..., nn.Module]:
    """A factory for timm's ``arch``, built with ``timm.create_model`` (never ``pretrained=True``: weights come
    from ``--weights FILE``); ``image_size`` is passed on as ``img_size`` to the models that take it (ViT,
    Swin …: their position tables depend on it) and ignored by those that don't."""

    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
        timm = require_timm()
        if not timm.is_model(arch):
            names = timm.list_models()
            near = closest_match(arch, names)
            raise ResinspectError(
                f"unknown timm model '{arch}'"
                + (f"; did you mean 'timm:{near}'?" if near else ".")
                + f" timm {timm.__version__} has {len(names)} models (timm.list_models(); resinspect models lists "
                "the families)"
            )
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
        default = timm.get_pretrained_cfg(arch)
        default_size = (getattr(default, "input_size", None) or (3, 224, 224))[-1] if default else 224
        if image_size and image_size != default_size:
            try:
                return timm.create_model(arch, img_size=image_size, **kwargs)
            except TypeError:  # a convolutional network: any size goes
                pass
        return timm.create_model(arch, **kwargs)

    return factory


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel convolution by one with ``in_channels`` (same shape otherwise)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            new = nn.Conv2d(
                in_channels,
                m.out_channels,
                m.kernel_size,  # type: ignore[arg-type]
                stride=m.stride,  # type: ignore[arg-type]
                padding=m.padding,  # type: ignore[arg-type]
                dilation=m.dilation,  # type: ignore[arg-type]
                groups=1,
                bias=m.bias is not None,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            return


_FAMILIES = (
    ("resnext", "ResNeXt"),
    ("wide_resnet", "Wide ResNet"),
    ("resnet", "ResNet (He et al. 2016)"),
    ("regnet", "RegNet"),
    ("mobilenet", "MobileNet (inverted residuals)"),
    ("efficientnet", "EfficientNet (MBConv blocks, stochastic depth)"),
    ("convnext", "ConvNeXt (layer scale, stochastic depth)"),
    ("vit", "Vision Transformer"),
    ("swin", "Swin Transformer"),
    ("maxvit", "MaxViT"),
    ("densenet", "DenseNet (concatenation, not addition)"),
    ("vgg", "VGG (no shortcuts)"),
    ("alexnet", "AlexNet (no shortcuts)"),
)


def _torchvision_description(arch: str) -> str:
    family = next((d for prefix, d in _FAMILIES if arch.startswith(prefix)), arch)
    return f"torchvision's {arch}, {family}; --weights for its ImageNet weights, else adapted to the dataset"


MODELS: dict[str, ModelSpec] = {}
for _n, _depth in ((1, 8), (2, 14), (3, 20), (5, 32), (7, 44), (9, 56), (18, 110)):
    MODELS[f"resnet{_depth}"] = ModelSpec(
        f"resnet{_depth}",
        f"CIFAR ResNet-{_depth} (He et al. 2016 §4.2), {3 * _n} residual blocks",
        _cifar(_n, True),
        twin=f"plain{_depth}",
    )
    MODELS[f"plain{_depth}"] = ModelSpec(
        f"plain{_depth}", f"plain twin of resnet{_depth}: same layers, no shortcuts", _cifar(_n, False)
    )
MODELS["seed34"] = ModelSpec(
    "seed34",
    "the origin document's [3,4,6,3] basic-block ResNet for 1×28×28 input (widths 16-128)",
    _seed(True),
    twin="plainseed34",
)
MODELS["plainseed34"] = ModelSpec("plainseed34", "plain twin of seed34", _seed(False))


def _register_vits() -> None:
    from .vit import vit_tiny

    MODELS["vit-tiny"] = ModelSpec(
        "vit-tiny",
        "small pre-norm Vision Transformer (6 layers, width 128, 4 heads, patch 4): attention and MLP sites",
        vit_tiny(6),
    )
    for depth in (2, 4, 8, 12):
        MODELS[f"vit-tiny-{depth}"] = ModelSpec(
            f"vit-tiny-{depth}", f"vit-tiny with {depth} layers ({2 * depth} residual sites)", vit_tiny(depth)
        )


_register_vits()


def _register_gpts() -> None:
    from .gpt import gpt_factory

    MODELS["gpt-tiny"] = ModelSpec(
        "gpt-tiny",
        "small GPT language model (pre-LayerNorm, learned positions, 4 layers, width 128, 4 heads, context from "
        "the data): attention and MLP sites; for next-token data (induction, text)",
        gpt_factory(4),
        task="next-token",
    )
    for depth in (2, 6, 8):
        MODELS[f"gpt-tiny-{depth}"] = ModelSpec(
            f"gpt-tiny-{depth}",
            f"gpt-tiny with {depth} layers ({2 * depth} residual sites)",
            gpt_factory(depth),
            task="next-token",
        )
    MODELS["attn-only-2"] = ModelSpec(
        "attn-only-2",
        "two attention-only layers (width 128, 4 heads): the induction-head model of Olsson et al. 2022",
        gpt_factory(2, mlp=False),
        task="next-token",
    )


_register_gpts()


def _register_torchvision() -> None:
    from .pretrained import torchvision_builders

    for arch in torchvision_builders():
        MODELS[f"torchvision:{arch}"] = ModelSpec(
            f"torchvision:{arch}", _torchvision_description(arch), _torchvision(arch), source="torchvision"
        )


_register_torchvision()


class ModelRegistry:
    """What ``resinspect_register_models(registry)`` receives: ``registry.add(name, factory, description)``."""

    def __init__(self, plugin: str, models: dict[str, ModelSpec] | None = None):
        self.plugin = plugin
        self.models = MODELS if models is None else models

    def add(self, name: str, factory: Callable[..., nn.Module], description: str, twin: str | None = None) -> None:
        """Register ``factory`` (called with ``in_channels``, ``num_classes``, ``image_size`` if it accepts
        them) as model ``name``; ``twin`` names its registered plain twin, if it has one."""
        existing = self.models.get(name)
        if existing is not None and existing.source != f"plugin {self.plugin}":
            raise ValueError(f"plugin {self.plugin}: model name '{name}' is already registered by {existing.source}")
        if not callable(factory):
            raise TypeError(f"plugin {self.plugin}: the factory of model '{name}' is not callable")
        self.models[name] = ModelSpec(name, description, factory, twin, f"plugin {self.plugin}")


def model_names() -> list[str]:
    return list(MODELS)


def _is_factory_path(name: str) -> bool:
    module, _, func = name.partition(":")
    return (
        bool(module and func)
        and module not in ("torchvision", "timm", "hf")
        and all(part.isidentifier() for part in module.split(".") + [func])
    )


def _user_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownNameError("model", name, model_names()) from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ValueError(f"model factory '{name}': module '{module_name}' has no callable '{func_name}'")
    return factory


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of the model called ``name`` (registered, or ``package.module:function``), nothing built.

    Raises ``UnknownNameError`` (listing the valid names and the closest one)
    for an unknown name.
    """
    if name in MODELS:
        return MODELS[name].factory
    if name.startswith("timm:") and name.partition(":")[2]:
        return _timm(name.partition(":")[2])
    if name.startswith("hf:") and name.partition(":")[2]:
        from .hf import hf_factory

        return hf_factory(name.partition(":")[2])
    if not _is_factory_path(name):
        raise UnknownNameError("model", name, model_names())
    return _user_factory(name)


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int | None = None) -> nn.Module:
    """Build the model called ``name`` for the given input channels and class count (see
    :func:`model_factory` for the names)."""
    factory = model_factory(name)
    params = inspect.signature(factory).parameters
    offered = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if accepts_all or k in params}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def twin_name(name: str) -> str | None:
    """The plain twin's model name, or None when the model has no registered twin."""
    spec = MODELS.get(name)
    return spec.twin if spec else None


BRANCH_KINDS = ("attention", "mlp")


def remove_skips(model: nn.Module, kind: str | None = None) -> nn.Module:
    """``model`` with every residual block replaced, in place, by its ``drop_skip`` variant: the same branch
    modules (downsampling blocks keep their strided branch; projection shortcuts are dropped), no addition.
    With ``kind`` (``attention`` or ``mlp``, see :data:`BRANCH_KINDS`), only the skips of the residual sites of
    that kind go (Ji et al. 2025 remove a transformer's attention skips or its MLP skips).
    Raises ``ValueError`` when the model has no residual block (of that kind) to remove."""
    from ..anatomy import no_blocks_reason, replace_block_module, residual_blocks

    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no residual blocks ({no_blocks_reason(blocks)}), so it has no plain twin"
        )
    if kind is not None:
        found = sorted({b.kind for b in blocks})
        chosen = [b for b in blocks if b.kind == kind]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no residual sites of kind '{kind}' (its kinds: {', '.join(found)}), "
                f"so it has no plain-{kind} twin"
            )
    for b in chosen if kind is not None else blocks:
        plain = b.graph_module("drop_skip")
        plain.delete_all_unused_submodules()  # the projection shortcut is gone from the twin, not just unused
        replace_block_module(model, b, plain)
    return model


def plain_twin_of(
    name: str, in_channels: int = 3, num_classes: int = 10, image_size: int | None = None, kind: str | None = None
) -> nn.Module:
    """The plain twin of any model whose residual blocks are found: the same architecture, built (and so
    initialised, under the caller's seed) as ``build_model(name)`` builds it, with every skip removed (or only
    those of the sites of ``kind``)."""
    return remove_skips(build_model(name, in_channels, num_classes, image_size), kind)
