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
    assert cfg["method"] == {"name": "stkd", "temperature": 6.0, "ce_weight": 0.5, "kd_weight": 0.91,
                             "mixup_alpha": 1.0, "teacher_target": "mixed_output", "clean_kd_weight": 0.5,
                             "standardize": False}
    assert cfg["data"]["path"] == str(digits)
    assert cfg["mlflow"]["tracking_uri"]


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=0.1", "optim.lrr: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("optim.lr=fast", "optim.lr: expected int or float"),
    ("optim.epochs=2.5", "optim.epochs: expected int"),
    ("train.use_gpu=maybe", "train.use_gpu: expected bool"),
    ("model.student=resnet9", "unknown model 'resnet9'"),
    ("method.name=no-such-method", "unknown method 'no-such-method'"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("train.bf16=true", "train.bf16: replaced by train.precision (auto | bf16 | fp16 | fp32"),
    ("train.precision=fp8", "train.precision: expected one of auto, bf16, fp16, fp32, got 'fp8'"),
    ("train.precision=fp16", "train.precision: fp16 trains on CUDA devices only"),
    ("optim.batch_size=1", "global batch"),
    ("data.val_fraction=1.0", "data.val_fraction: must be in [0, 1), got 1.0"),
    ("data.val_fraction=-0.1", "data.val_fraction: must be in [0, 1), got -0.1"),
    ("optim.schedule=linear", "optim.schedule: expected one of multistep, cosine, got 'linear'"),
    ("optim.warmup_epochs=2", "optim.warmup_epochs: must be in [0, optim.epochs=2), got 2"),
    ("train.workers=0", "train.workers: must be > 0, got 0"),
    ("train.workers=[1]", "train.workers: a number of workers, or [min, max] (two integers)"),
    ("train.workers=[1, 2, 3]", "got [1, 2, 3]"),
    ("train.workers=[1, two]", "train.workers: a number of workers, or [min, max]"),
    ("train.workers=[0, 2]", "train.workers: [min, max] needs min >= 1, got [0, 2]"),
    ("train.workers=[3, 2]", "train.workers: [min, max] needs min <= max, got [3, 2]"),
    ("train.workers=two", "train.workers: expected int or list"),
    ("train.workers=true", "train.workers: expected int or list"),
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


def test_a_method_switched_on_the_command_line_starts_from_its_own_defaults(base):
    # The pair recipe is STKD at STKD's defaults (ce_weight 0.5).
    cfg = config.load("cifar100_resnet56_resnet20", [base[0], "method.name=dkd"])
    assert cfg["method"] == {"name": "dkd", "temperature": 4.0, "ce_weight": 1.0, "tckd_weight": 1.0,
                             "nckd_weight": 8.0, "warmup_epochs": 20, "standardize": False}
    cfg = config.load("cifar100_resnet56_resnet20", [base[0], "method.name=dkd", "method.temperature=2"])
    assert (cfg["method"]["temperature"], cfg["method"]["ce_weight"]) == (2.0, 1.0)


def test_the_recipes_own_method_keeps_its_hyperparameters(base):
    cfg = config.load("cifar100_resnet56_resnet20", [base[0], "method.kd_weight=0.5", "method.mixup_alpha=0.4"])
    assert (cfg["method"]["name"], cfg["method"]["mixup_alpha"], cfg["method"]["kd_weight"]) == ("stkd", 0.4, 0.5)
    assert config.with_method(cfg, {"name": "stkd", "standardize": True})["method"]["mixup_alpha"] == 0.4


def test_with_method_follows_the_same_rule(base):
    stkd = config.load("cifar100_resnet56_resnet20", [base[0]])
    assert config.with_method(stkd, {"name": "dkd"})["method"]["ce_weight"] == 1.0
    assert config.with_method(stkd, {"name": "stkd", "standardize": True})["method"]["ce_weight"] == 0.5
    assert config.with_method(stkd, {"name": "kd"})["method"] == {
        "name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": False}


def test_a_hyperparameter_the_method_does_not_take_is_refused(base):
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['mixup_alpha'\]"):
        load(base, "method.name=kd", "teacher.source=t", "method.mixup_alpha=0.3")
    with pytest.raises(ConfigError, match="method.standardize: .*'ce' has none \\(got True\\)"):
        load(base, "method.standardize=true")


def test_milestones_past_the_end_are_refused_by_name(base):
    with pytest.raises(ConfigError, match=r"optim.milestones: \[150, 180, 210\] not within the 100 epochs"):
        config.load("cifar100_resnet56_resnet20", [base[0], "optim.epochs=100"])
    with pytest.raises(ConfigError, match=r"optim.milestones: \[5\] not within the 3 epochs"):
        load(base, "optim.schedule=multistep", "optim.epochs=3", "optim.milestones=[1, 5]")
    assert load(base, "optim.schedule=cosine", "optim.epochs=3", "optim.milestones=[1, 5]")  # ignored by cosine


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


def test_run_names_say_method_teacher_student_and_seed():
    cfg = config.load("demo_student", ["method.name=stkd", "train.seed=3"])
    assert config.run_label(cfg, "wrn_16_2") == "stkd-wrn_16_2-resnet8-s3"
    name = config.new_run_name(cfg, "wrn_16_2")
    assert name.startswith("stkd-wrn_16_2-resnet8-s3-") and len(name) == len("stkd-wrn_16_2-resnet8-s3-") + 4
    assert config.run_label(cfg) == "stkd-resnet8-s3"
    assert config.new_run_name(config.merge(cfg, {"train": {"run_name": "fixed"}})) == "fixed"



def test_an_elastic_range_resolves_to_ray_trains_min_max_tuple(base):
    cfg = load(base, "train.workers=[1, 2]")
    assert cfg["train"]["workers"] == [1, 2]
    assert config.scaling_workers(cfg["train"]["workers"]) == (1, 2)
    assert config.scaling_workers([2, 2]) == 2 and config.scaling_workers(3) == 3
    assert config.worker_range(4) == (4, 4) and config.max_workers([1, 3]) == 3
    assert config.workers_label([1, 2]) == "1-2" and config.workers_label(2) == "2"
    assert config.flatten(cfg)["train.workers"] == [1, 2]


def test_the_global_batch_must_cover_and_stream_evenly_over_every_size_of_an_elastic_range(base):
    with pytest.raises(ConfigError, match=r"optim.batch_size \(2\) is the global batch and must be >= train.workers "
                                          r"\(up to 3\)"):
        load(base, "train.workers=[1, 3]", "optim.batch_size=2")
    # In memory any batch deals out; streamed, it must divide by 2 and by 3.
    load(base, "train.workers=[1, 3]", "optim.batch_size=64")
    with pytest.raises(ConfigError, match=r"does not divide over train.workers=\[1, 3\] \(3 workers\).*use 60 or 66"):
        load(base, "train.workers=[1, 3]", "optim.batch_size=64", "data.in_memory=false")
    load(base, "train.workers=[1, 3]", "optim.batch_size=66", "data.in_memory=false")
    load(base, "train.workers=[1, 2]", "optim.batch_size=64", "data.in_memory=false")


def test_gpu_sharing_and_sync_bn_checks_count_the_largest_elastic_size(base):
    with pytest.raises(ConfigError, match="would put two ranks of one run on one GPU"):
        config.validate(config.merge(load(base), {"train": {"workers": [1, 2], "use_gpu": True,
                                                             "gpus_per_worker": 0.5, "precision": "fp32"}}))
    with pytest.raises(ConfigError, match=r"SyncBatchNorm is on \(auto: 16 samples per GPU with 4 workers"):
        config.validate(config.merge(load(base), {"optim": {"batch_size": 64}, "train": {
            "workers": [1, 4], "use_gpu": True, "compile": True, "precision": "fp32"}}))
    # The same run on a fixed 1 worker has nothing to synchronize.
    config.validate(config.merge(load(base), {"optim": {"batch_size": 64}, "train": {
        "workers": 1, "use_gpu": True, "compile": True, "precision": "fp32"}}))
