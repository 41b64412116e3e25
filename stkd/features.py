"""Intermediate features of any zoo model, taken with forward hooks: no second forward, no model edits.

Feature-based distillation (FitNet's hint, attention transfer, CRD's embedding) compares what the
student and the teacher compute at named stages. Each model family lists its stages here, shallow to
deep, by the dotted names of the modules whose outputs they are (the stage outputs RepDistiller's
``is_feat`` returns), plus ``pooled``: the flattened feature the classifier reads.

>>> taps = FeatureTaps(model, "resnet8", ["layer2", "pooled"])   # hooks on the unwrapped module
>>> logits = model(images)                                        # the ordinary forward
>>> taps.outputs["layer2"].shape                                  # (N, 32, 16, 16)
>>> taps.remove()

Hooks sit on the module itself, so a DDP or compiled wrapper around it runs them too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

POOLED = "pooled"

# family -> (stage module names shallow to deep, the classifier module whose input is ``pooled``)
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet": (("layer1", "layer2", "layer3"), "fc"),  # the CIFAR ResNets (resnet8 ... resnet110, x4)
    "wrn": (("block1", "block2", "block3"), "fc"),
    "vgg": (("block0", "block1", "block2", "block3", "block4"), "classifier"),
    "MobileNetV2": (("blocks.1", "blocks.2", "blocks.4", "blocks.6"), "classifier"),
    "ShuffleV1": (("layer1", "layer2", "layer3"), "linear"),
    "ShuffleV2": (("layer1", "layer2", "layer3"), "linear"),
    "ResNet50": (("layer1", "layer2", "layer3", "layer4"), "linear"),
}


def family(model_name: str) -> str:
    """The family of a zoo model name (``resnet32x4`` -> ``resnet``, ``wrn_40_2`` -> ``wrn``)."""
    for name in ("ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2"):
        if model_name == name:
            return name
    for prefix in ("resnet", "wrn", "vgg"):
        if model_name.startswith(prefix):
            return prefix
    raise ValueError(f"model {model_name!r} has no feature stages listed (families: {', '.join(FAMILIES)})")


def stage_names(model_name: str) -> tuple[str, ...]:
    """The stages a method may ask of ``model_name``, shallow to deep, then ``pooled``."""
    return (*FAMILIES[family(model_name)][0], POOLED)


class FeatureTaps:
    """Forward hooks keeping the outputs of ``stages`` of ``model`` (a zoo model named ``model_name``)
    from its latest forward in ``outputs``; ``remove()`` takes the hooks off."""

    def __init__(self, model: nn.Module, model_name: str, stages: Sequence[str]) -> None:
        stage_modules, classifier = FAMILIES[family(model_name)]
        unknown = [s for s in stages if s not in (*stage_modules, POOLED)]
        if unknown:
            raise ValueError(f"model {model_name!r} has no stage(s) {unknown}; it has: "
                             f"{', '.join(stage_names(model_name))}")
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for stage in stages:
            if stage == POOLED:
                self._handles.append(modules[classifier].register_forward_pre_hook(self._keep_input(stage)))
            else:
                self._handles.append(modules[stage].register_forward_hook(self._keep_output(stage)))

    def _keep_output(self, stage: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.outputs[stage] = output
        return hook

    def _keep_input(self, stage: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.outputs[stage] = args[0]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def stage_shapes(model: nn.Module, model_name: str, image_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Every stage's output shape (without the batch) for one ``(C, H, W)`` image: the probe forward a
    method's connectors are sized from. Runs in eval mode under ``no_grad`` and leaves the mode as it was."""
    taps = FeatureTaps(model, model_name, stage_names(model_name))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
        return {stage: tuple(out.shape[1:]) for stage, out in taps.outputs.items()}
    finally:
        taps.remove()
        model.train(was_training)
