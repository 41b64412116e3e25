from pathlib import Path

import pytest

from pipeline.sweep import space as search_space
from pipeline.sweep.space import SpaceError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_load():
    files = sorted(search_space.SPACES_DIR.glob("*.yaml"))
    assert {p.stem for p in files} >= {"stkd", "kd", "dkd", "demo"}
    for path in files:
        space = search_space.load_space(path)
        assert space["parameters"]


@pytest.mark.parametrize("body,needle", [
    ("method: stkd\nparameters:\n  method.alpha: {distribution: uniform, low: 0, high: 1}\n",
     "method.alpha: method 'stkd' does not take this parameter"),
    ("method: kd\nparameters:\n  method.mixup_alpha: {distribution: uniform, low: 0, high: 1}\n",
     "method.mixup_alpha: method 'kd' does not take"),
    ("method: stkd\nparameters:\n  method.temperature: {distribution: uniform, low: 4, high: 4}\n",
     "method.temperature: empty range, low (4) must be < high (4)"),
    ("method: stkd\nparameters:\n  method.temperature: {distribution: uniform, low: 6, high: 2}\n",
     "low (6) must be < high (2)"),
    ("method: stkd\nparameters:\n  method.temperature: {distribution: uniform, low: -1, high: 2}\n",
     "method.temperature: the space allows -1, but temperature must be > 0, got -1"),
    ("method: stkd\nparameters:\n  method.kd_weight: {distribution: choice, values: [-0.5, 1.0]}\n",
     "method.kd_weight: the space allows -0.5, but kd_weight must be >= 0, got -0.5"),
    ("method: dkd\nparameters:\n  method.warmup_epochs: {distribution: randint, low: -2, high: 5}\n",
     "method.warmup_epochs: the space allows -2, but warmup_epochs must be >= 0"),
    ("method: stkd\nparameters:\n  method.mixup_alpha: {distribution: grid, values: [0.2, -1.0]}\n",
     "method.mixup_alpha: the space allows -1.0, but mixup_alpha must be >= 0"),
    ("method: kd\nparameters:\n  method.standardize: {distribution: choice, values: [true, 1]}\n",
     "method.standardize: the space allows 1, but standardize must be true or false"),
    ("method: stkd\nparameters:\n  method.teacher_target: {distribution: uniform, low: 0, high: 1}\n",
     "method.teacher_target: the space allows 0, but teacher_target must be one of ['mixed_input', 'mixed_output']"),
    ("method: stkd\nparameters:\n  optim.lr: {distribution: loguniform, low: 0, high: 0.1}\n",
     "loguniform needs low > 0"),
    ("method: stkd\nparameters:\n  method.mixup_alpha: {distribution: choice, values: []}\n",
     "non-empty list"),
    ("method: stkd\nparameters:\n  method.mixup_alpha: {distribution: normal, mean: 1}\n",
     "expected {distribution"),
    ("method: stkd\nparameters:\n  method.teacher_target: {distribution: choice, values: [mixed, mixed_input]}\n",
     "teacher_target: the space allows 'mixed', but teacher_target must be one of"),
    ("method: no-such-method\nparameters:\n  optim.lr: {distribution: uniform, low: 0.01, high: 0.1}\n",
     "unknown method 'no-such-method'"),
    ("method: stkd\nparameters: {}\n", "non-empty mapping"),
    ("method: stkd\nsamples: 3\nparameters:\n  optim.lr: {distribution: uniform, low: 0.01, high: 0.1}\n",
     "unknown top-level key"),
    ("method: stkd\nmetric: test/top1\nparameters:\n  optim.lr: {distribution: uniform, low: 0.01, high: 0.1}\n",
     "metric: trials are compared on the validation split (val/top1, val/top5), never on test; got 'test/top1'"),
])
def test_invalid_spaces_name_file_and_key(tmp_path, body, needle):
    path = write(tmp_path, body)
    with pytest.raises(SpaceError) as info:
        search_space.load_space(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_apply_sets_dotted_keys_and_validates(tiny_overrides):
    from pipeline import config

    base = config.load("demo_student", tiny_overrides)
    cfg = search_space.apply(base, {"method.temperature": 2.5, "optim.lr": 0.02})
    assert cfg["method"]["temperature"] == 2.5 and cfg["optim"]["lr"] == 0.02
    assert base["method"]["temperature"] == 7.3  # the base (STKD at its defaults) is not modified


def test_trial_count_multiplies_the_grid_points_by_the_samples():
    grid = {"optim.lr": {"distribution": "grid", "values": [0.01, 0.05, 0.1]},
            "method.mixup_alpha": {"distribution": "grid", "values": [0.2, 1.0]},
            "method.temperature": {"distribution": "uniform", "low": 1.0, "high": 8.0}}
    assert search_space.trial_count(grid, samples=2) == 12
    assert search_space.trial_count({"optim.lr": grid["optim.lr"]}, samples=1) == 3
    assert search_space.trial_count({"method.temperature": grid["method.temperature"]}, samples=4) == 4
