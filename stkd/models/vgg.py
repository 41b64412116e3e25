"""CIFAR VGG with batch norm (vgg8/11/13/16/19) as used in CRD / mdistiller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stkd.models.init import init_conv_bn

# Per-stage conv widths; max-pools sit between stages, not inside them.
CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    # A 2x2 pool on a 1-pixel map would produce an empty tensor; leave such maps alone.
    if min(x.shape[-2:]) < 2:
        return x
    return F.max_pool2d(x, kernel_size=2, stride=2)


class VGG(nn.Module):
    """Five conv stages (conv3x3-BN-ReLU), 2x2 max-pools between them, global average pool, linear."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        stages = []
        c_in = in_channels
        for widths in cfg:
            stages.append(self._make_stage(widths, c_in))
            c_in = widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    @staticmethod
    def _make_stage(widths: list[int], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in widths:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        large_input = x.shape[-1] >= 64
        x = _max_pool(self.block0(x))
        x = _max_pool(self.block1(x))
        x = _max_pool(self.block2(x))
        x = self.block3(x)
        # The original pools after stage 3 only for 64 px (Tiny-ImageNet) inputs, so that
        # stage 4 runs at 4x4 for both 32 and 64 px images.
        if large_input:
            x = _max_pool(x)
        x = self.block4(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg8(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-8 with BN (config S)."""
    return VGG(CFG["S"], num_classes, in_channels)


def vgg11(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-11 with BN (config A)."""
    return VGG(CFG["A"], num_classes, in_channels)


def vgg13(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-13 with BN (config B)."""
    return VGG(CFG["B"], num_classes, in_channels)


def vgg16(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-16 with BN (config D)."""
    return VGG(CFG["D"], num_classes, in_channels)


def vgg19(num_classes: int, in_channels: int = 3) -> VGG:
    """VGG-19 with BN (config E)."""
    return VGG(CFG["E"], num_classes, in_channels)
