"""CIFAR model zoo of the distillation literature (CRD / RepDistiller / mdistiller).

All models map ``(N, in_channels, H, W)`` images (any square size from 8 px) to logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .mobilenetv2 import mobile_half
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnet_imagenet import ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["REGISTRY", "create", "names"]

# name -> constructor(num_classes, in_channels)
REGISTRY: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    "ResNet50": ResNet50,
}


def names() -> list[str]:
    """Sorted list of registered model names."""
    return sorted(REGISTRY)


def create(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the model ``name`` with a ``num_classes``-way classifier and ``in_channels`` input channels."""
    try:
        ctor = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}") from None
    return ctor(num_classes, in_channels)
