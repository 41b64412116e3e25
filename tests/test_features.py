"""Feature taps (stkd/features.py): every zoo family gives its stages from the ordinary forward, the
pooled feature is exactly what the classifier reads, the taps keep the graph for the student's loss,
and a stage a family lacks is refused naming model and stage."""

from __future__ import annotations

import pytest
import torch

from stkd import features, models

ONE_PER_FAMILY = ["resnet8", "resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]
SEQUENTIAL = {"resnet8": ("layer1", "layer2", "layer3"), "wrn_16_2": ("block1", "block2", "block3"),
              "ShuffleV2": ("layer1", "layer2", "layer3"), "ResNet50": ("layer1", "layer2", "layer3", "layer4")}


def model_in_eval(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create(name, 10, in_channels=3).eval()


@pytest.mark.parametrize("name", models.names())
def test_every_zoo_model_has_its_family_stages_with_shrinking_maps(name):
    model = model_in_eval(name)
    shapes = features.stage_shapes(model, name, (3, 16, 16))
    stages = features.stage_names(name)
    assert list(shapes) == list(stages) and stages[-1] == features.POOLED
    maps = [shapes[s] for s in stages[:-1]]
    assert all(len(m) == 3 for m in maps), maps
    sizes = [m[1] for m in maps]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 16, f"{name}: spatial sizes {sizes}"
    classifier = dict(model.named_modules())[features.FAMILIES[features.family(name)][1]]
    linear = next(m for m in classifier.modules() if isinstance(m, torch.nn.Linear))
    assert shapes[features.POOLED] == (linear.in_features,)
    assert not model.training


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_pooled_is_exactly_what_the_classifier_reads(name):
    model = model_in_eval(name)
    taps = features.FeatureTaps(model, name, [features.POOLED])
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 16, 16))
    classifier = dict(model.named_modules())[features.FAMILIES[features.family(name)][1]]
    torch.testing.assert_close(classifier(taps.outputs[features.POOLED]), logits)


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_each_stage_is_the_next_stage_input_unchanged_by_later_in_place_ops(name):
    model = model_in_eval(name)
    stages = SEQUENTIAL[name]
    taps = features.FeatureTaps(model, name, stages)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
        modules = dict(model.named_modules())
        for shallow, deep in zip(stages, stages[1:]):
            torch.testing.assert_close(modules[deep](taps.outputs[shallow]), taps.outputs[deep])


def test_taps_keep_the_graph_and_stop_after_remove():
    model = models.create("resnet8", 10, in_channels=1)
    taps = features.FeatureTaps(model, "resnet8", ["layer2"])
    model(torch.randn(2, 1, 16, 16))
    taps.outputs["layer2"].pow(2).mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None, "the loss on layer2 reaches nothing after it"
    first = taps.outputs["layer2"]
    taps.remove()
    model(torch.randn(2, 1, 16, 16))
    assert taps.outputs["layer2"] is first


def test_a_stage_the_family_lacks_is_refused_naming_model_and_stage():
    model = models.create("resnet8", 10)
    with pytest.raises(ValueError, match=r"model 'resnet8' has no stage\(s\) \['layer4'\]; it has: layer1, layer2, "
                                         r"layer3, pooled"):
        features.FeatureTaps(model, "resnet8", ["layer2", "layer4"])
    with pytest.raises(ValueError, match="model 'alexnet' has no feature stages listed"):
        features.stage_names("alexnet")
