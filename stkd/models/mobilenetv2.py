"""MobileNetV2 for CIFAR (CRD's ``mobile_half``: expansion T=6, width 0.5)."""

from __future__ import annotations

import torch
from torch import nn

from stkd.models.init import init_conv_bn


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand -> depthwise 3x3 -> linear pointwise project, residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # Expansion conv is kept even for t=1, as in the CRD implementation.
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with configurable expansion ``T`` and width multiplier."""

    def __init__(self, T: int, num_classes: int, width_mult: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, input_channel, 3, 2)
        blocks = []
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Sequential keeps state_dict keys ("classifier.0.*") compatible with CRD checkpoints.
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        out = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(torch.flatten(self.avgpool(out), 1))


def mobile_half(num_classes: int, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 with T=6 and width 0.5 (registered as ``MobileNetV2``)."""
    return MobileNetV2(6, num_classes, 0.5, in_channels)
