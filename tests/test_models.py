"""Tests for the CIFAR model zoo in stkd.models."""

from __future__ import annotations

import pytest
import torch

from stkd import models

EXPECTED_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
]  # fmt: skip

# Millions of parameters with 100 classes, as published in CRD / mdistiller.
PUBLISHED_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
    "ResNet50": 23.7,
}

ONE_PER_FAMILY = ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _train_step(model: torch.nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)


def test_names_are_sorted_and_complete() -> None:
    assert models.names() == sorted(EXPECTED_NAMES)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        models.create("resnet9000", num_classes=10)
    message = str(excinfo.value)
    assert "resnet9000" in message
    for name in EXPECTED_NAMES:
        assert name in message


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_forward_backward_cifar(name: str) -> None:
    model = models.create(name, num_classes=10)
    _train_step(model, torch.randn(2, 3, 32, 32), num_classes=10)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name: str) -> None:
    model = models.create(name, num_classes=100)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.02)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_tiny_grey_input(name: str) -> None:
    model = models.create(name, num_classes=7, in_channels=1)
    _train_step(model, torch.randn(2, 1, 8, 8), num_classes=7)


@pytest.mark.parametrize("name", ["vgg8", "resnet8"])
def test_large_input(name: str) -> None:
    model = models.create(name, num_classes=10)
    _train_step(model, torch.randn(2, 3, 64, 64), num_classes=10)


@pytest.mark.parametrize("name", ["resnet8x4", "ShuffleV2"])
def test_channels_last_matches_contiguous(name: str) -> None:
    model = models.create(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_bf16_autocast_forward(name: str) -> None:
    model = models.create(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out.float()).all()


def test_bf16_autocast_backward() -> None:
    model = models.create("ShuffleV1", num_classes=10).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert model.conv1.weight.grad is not None
