"""Models: CIFAR ResNets and plain twins, torchvision adapters, user factories, checkpoints."""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .registry import MODELS, ModelRegistry, ModelSpec, build_model, model_names, plain_twin_of, remove_skips, twin_name
from .resnet import BasicBlock, ResNet

__all__ = [
    "BasicBlock",
    "ResNet",
    "MODELS",
    "ModelSpec",
    "build_model",
    "model_names",
    "twin_name",
    "ModelRegistry",
    "plain_twin_of",
    "remove_skips",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]
