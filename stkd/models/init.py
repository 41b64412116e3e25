"""The weight initialisation the CIFAR models of the distillation literature share."""

from __future__ import annotations

import torch.nn as nn


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions with zero bias; BatchNorm scale 1, shift 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
