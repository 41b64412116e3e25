import pytest

from pipeline import config
from pipeline.config import ConfigError


@pytest.fixture
def base(tiny_overrides):
    return tiny_overrides


def load(base, *more, recipe="test_tiny"):
    return config.load(recipe, list(base) + list(more))


def test_tiny_recipe_resolves_with_defaults(base, digits):
    cfg = load(base, "optim.lr=0.2", "method.name=stkd", "teacher.source=some-teacher", "method.temperature=6")
    assert cfg["optim"]["lr"] == 0.2
    assert cfg["method"] == {"name": "stkd", "temperature": 6.0, "ce_weight": 0.1, "kd_weight": 0.9,
                             "mixup_alpha": 1.0, "teacher_target": "mixed_input", "clean_kd_weight": 0.0}
    assert cfg["data"]["path"] == str(digits)
    assert cfg["mlflow"]["tracking_uri"]


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=0.1", "optim.lrr: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("optim.lr=fast", "optim.lr: expected int or float"),
    ("optim.epochs=2.5", "optim.epochs: expected int"),
    ("train.use_gpu=maybe", "train.use_gpu: expected bool"),
    ("model.student=resnet9", "unknown model 'resnet9'"),
    ("method.name=fitnet", "unknown method 'fitnet'"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("train.bf16=sometimes", "train.bf16"),
    ("optim.batch_size=1", "global batch"),
])
def test_invalid_values_get_one_clear_message(base, override, needle):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load(base, override)
    assert needle in str(info.value)


def test_missing_teacher_and_bad_hyperparameters(base):
    with pytest.raises(ConfigError, match="teacher.source: method 'kd' needs a teacher"):
        load(base, "method.name=kd")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        load(base, "method.name=kd", "teacher.source=t", "method.temperature=0")
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        load(base, "method.name=kd", "teacher.source=t", "method.temprature=3")


def test_hyperparameters_of_other_methods_are_dropped_when_switching(base):
    cfg = load(base, "method.name=stkd", "teacher.source=t", "method.mixup_alpha=0.3", "method.name=kd")
    assert "mixup_alpha" not in cfg["method"]


def test_several_problems_are_reported_together(base):
    with pytest.raises(ConfigError) as info:
        load(base, "optim.lrr=1", "model.student=nope")
    assert "optim.lrr" in str(info.value) and "nope" in str(info.value)


def test_recipe_not_found_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        config.load("no_such_recipe")
    with pytest.raises(ConfigError, match="section.key=value"):
        config.parse_overrides(["optim.lr"])


def test_every_shipped_recipe_validates(base):
    runnable = [p for p in sorted(config.RECIPES_DIR.glob("*.yaml")) if config.read_recipe(p).get("model")]
    assert len(runnable) >= 30
    for path in runnable:  # the others are bases that name no model
        raw = config.read_recipe(path)
        extra = [] if raw.get("method", {}).get("name", "ce") == "ce" or raw.get("teacher") else ["teacher.source=t"]
        cfg = config.load(path, [base[0]] + extra)
        assert cfg["model"]["student"], path


def test_recipe_base_chain(tmp_path, base):
    (tmp_path / "parent.yaml").write_text("base: test_tiny\noptim:\n  lr: 0.3\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim:\n  epochs: 7\n")
    cfg = config.load(tmp_path / "child.yaml", base)
    assert (cfg["optim"]["lr"], cfg["optim"]["epochs"], cfg["model"]["student"]) == (0.3, 7, "resnet8")
