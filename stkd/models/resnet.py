"""CIFAR ResNets (resnet8..resnet110, resnet8x4, resnet32x4) as used in CRD / mdistiller."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stkd.models.init import init_conv_bn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with 4x channel expansion."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    """Depth-parameterised CIFAR ResNet: a stem conv and three stages (strides 1, 2, 2)."""

    def __init__(
        self,
        depth: int,
        num_filters: list[int],
        block_name: str = "basicblock",
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError("BasicBlock ResNet depth must be 6n+2 (e.g. 20, 32, 56, 110)")
            n = (depth - 2) // 6
            block = BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError("Bottleneck ResNet depth must be 9n+2 (e.g. 29, 47, 56)")
            n = (depth - 2) // 9
            block = Bottleneck
        else:
            raise ValueError("block_name must be 'basicblock' or 'bottleneck'")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        # Adaptive instead of the original AvgPool2d(8): identical at 32 px, works at any size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        init_conv_bn(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_THIN = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-8 (widths 16/16/32/64)."""
    return ResNet(8, _THIN, "basicblock", num_classes, in_channels)


def resnet14(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-14 (widths 16/16/32/64)."""
    return ResNet(14, _THIN, "basicblock", num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-20 (widths 16/16/32/64)."""
    return ResNet(20, _THIN, "basicblock", num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-32 (widths 16/16/32/64)."""
    return ResNet(32, _THIN, "basicblock", num_classes, in_channels)


def resnet44(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-44 (widths 16/16/32/64)."""
    return ResNet(44, _THIN, "basicblock", num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-56 (widths 16/16/32/64)."""
    return ResNet(56, _THIN, "basicblock", num_classes, in_channels)


def resnet110(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-110 (widths 16/16/32/64)."""
    return ResNet(110, _THIN, "basicblock", num_classes, in_channels)


def resnet8x4(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-8 with 4x widths (32/64/128/256)."""
    return ResNet(8, _WIDE, "basicblock", num_classes, in_channels)


def resnet32x4(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-32 with 4x widths (32/64/128/256)."""
    return ResNet(32, _WIDE, "basicblock", num_classes, in_channels)
