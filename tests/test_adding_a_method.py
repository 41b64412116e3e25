"""README, "Adding a method": the two example methods, taken from the README as written, registered by the
registry line it shows, built and trained a step, and their hyperparameters validated like a shipped one's."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline import ROOT, config as config_lib
from stkd import methods, models

README = (ROOT / "README.md").read_text()


def example(file: str) -> str:
    """The Python block the README shows for ``file``."""
    match = re.search(rf"`{re.escape(file)}`:\n\n```python\n(.*?)```", README, re.S)
    assert match, f"the README shows no {file}"
    return match.group(1)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """Both examples as the README has them, in files of their own, and their registry lines."""
    package = tmp_path / "readme_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    lines = re.search(r"REGISTRY = \{\.\.\., (.*?)\}", README).group(1)
    entries = dict(re.findall(r'"(\w+)": "stkd\.(\w+:\w+)"', lines))
    assert set(entries) == {"l2kd", "pooled_match"}, lines
    for name, target in entries.items():
        module = target.split(":")[0]
        (package / f"{module}.py").write_text(example(f"stkd/{module}.py"))
        monkeypatch.setitem(methods.REGISTRY, name, f"readme_methods.{target}")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for module in [m for m in sys.modules if m.startswith("readme_methods")]:
        del sys.modules[module]


def pair(student: str = "resnet8", teacher: str = "resnet20"):
    torch.manual_seed(0)
    return models.create(student, 10), models.create(teacher, 10)


def test_the_logit_example_trains_with_its_terms_as_written(registered):
    student, teacher = pair()
    method = methods.create("l2kd", student, teacher, l2_weight=2.0)
    assert method.hparams == {"ce_weight": 1.0, "l2_weight": 2.0} and method.term_names() == ("ce", "l2")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    method.train()
    logits, terms = method.forward_train(x, y)
    with torch.no_grad():
        expected = 2.0 * ((student(x) - teacher(x)) ** 2).mean()
    assert terms["l2"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher is never trained"
    assert all(p.grad is not None for p in student.parameters())


def test_the_feature_example_trains_its_projection_with_the_student(registered):
    student, teacher = pair("resnet8", "resnet32x4")  # pooled features of 64 and 256 channels
    method = methods.create("pooled_match", student, teacher, architectures=("resnet8", "resnet32x4"),
                            image_shape=(3, 32, 32))
    projection = method.own_modules()["projection"]
    assert (projection.in_features, projection.out_features) == (64, 256)
    trained = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in projection.parameters()} <= trained, "optimised with the student"
    assert "projection" in method.own_state_dict(), "saved in checkpoints"
    method.train()
    logits, terms = method.forward_train(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 10) and set(terms) == {"ce", "match"} and terms["match"].item() > 0
    sum(terms.values()).backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_a_registered_example_is_configured_like_a_shipped_method(registered, tmp_path):
    base = [f"data.path={tmp_path}", "teacher.source=some-teacher"]
    config = config_lib.load("test_tiny", [*base, "method.name=l2kd", "method.l2_weight=1"])
    assert config["method"] == {"name": "l2kd", "ce_weight": 1.0, "l2_weight": 1.0}
    with pytest.raises(config_lib.ConfigError, match=r"l2_weight must be >= 0, got -1"):
        config_lib.load("test_tiny", [*base, "method.name=l2kd", "method.l2_weight=-1"])
    with pytest.raises(config_lib.ConfigError, match=r"method 'l2kd' got unknown hyperparameter\(s\) \['temperature'\]"):
        config_lib.load("test_tiny", [*base, "method.name=l2kd", "method.temperature=4"])


def test_a_registry_line_that_names_no_method_is_refused(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "not_a_method", "torch.nn:Linear")
    with pytest.raises(TypeError, match=r"torch\.nn:Linear is not a subclass of stkd\.methods\.Method"):
        methods.method_class("not_a_method")
