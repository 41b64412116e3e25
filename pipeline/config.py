"""Experiment configuration: YAML recipes, dotted overrides, validation before anything is scheduled.

A recipe is a nested mapping; ``base:`` names another recipe it extends. The resolved config is a
plain dict (logged whole to MLflow). Every problem is collected into one ``ConfigError`` whose
message a user can act on.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage, tracking
from stkd import methods, models, precision

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"

# Every key the config takes, with its default; the default's type is the expected type unless
# TYPES says otherwise (for keys whose default is None or that accept several types).
DEFAULTS: dict[str, Any] = {
    "name": "stkd",
    "data": {
        "path": None,
        "in_memory": True,
        "crop_padding": 4,
        "flip": True,
        "eval_batch_size": 512,
        "val_fraction": 0.0,
        "val_seed": 0,
        "eval_every": 1,
    },
    "model": {"student": None},
    "teacher": {"source": None, "evaluate": True},
    "method": {"name": "ce"},
    "optim": {
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "nesterov": False,
        "batch_size": 64,
        "epochs": 240,
        "schedule": "multistep",
        "milestones": [150, 180, 210],
        "gamma": 0.1,
        "warmup_epochs": 0,
    },
    "train": {
        "workers": 1,  # an int, or [min, max]: elastic (see worker_range)
        "use_gpu": False,
        "cpus_per_worker": 1.0,
        "gpus_per_worker": 1.0,
        "precision": "auto",  # auto | bf16 | fp16 | fp32: see stkd.precision
        "channels_last": "auto",
        "compile": False,
        "sync_bn": "auto",
        "seed": 0,
        "checkpoint_every": 10,
        "max_failures": 0,
        "preemption_watcher": False,
        "storage_path": "runs",
        "run_name": None,
        # A stopped run's wait for its workers to finish the epoch and checkpoint (pipeline.stopping);
        # `ray job stop` kills after RAY_JOB_STOP_WAIT_TIME_S (3 s): raise both together.
        "stop_grace_s": 2.0,
    },
    # outage_wait_s: how long the end of a run waits for a tracking server that is away (see README).
    "mlflow": {"tracking_uri": None, "experiment": "stkd", "register_as": None, "outage_wait_s": 1800},
    # Sweeps and studies (`stkd tune`, `stkd study`); a single run ignores them.
    "tune": {
        "max_concurrent": None,  # trials at once; default: all (the autoscaler adds nodes as they wait)
        "resource_timeout_s": 1800,  # end the sweep when no trial progresses this long while resources are awaited
        "max_failures": 2,  # a failed trial (its node died) runs again, from its last checkpoint
        "grace_period": None,  # ASHA's first rung, in epochs; default: just after the first learning-rate drop
        "reduction_factor": 2,
    },
}

TYPES: dict[str, tuple[type, ...]] = {
    "data.path": (str,),
    "model.student": (str,),
    "teacher.source": (str, type(None)),
    "train.workers": (int, list),
    "train.channels_last": (bool, str),
    "train.sync_bn": (bool, str),
    "train.run_name": (str, type(None)),
    "mlflow.tracking_uri": (str, type(None)),
    "mlflow.register_as": (str, type(None)),
    "optim.lr": (int, float),
    "optim.momentum": (int, float),
    "optim.weight_decay": (int, float),
    "optim.gamma": (int, float),
    "data.val_fraction": (int, float),
    "train.cpus_per_worker": (int, float),
    "train.gpus_per_worker": (int, float),
    "mlflow.outage_wait_s": (int, float),
    "train.stop_grace_s": (int, float),
    "tune.max_concurrent": (int, type(None)),
    "tune.resource_timeout_s": (int, float),
    "tune.grace_period": (int, type(None)),
}


SCHEDULES = ("multistep", "cosine")

# Keys an older recipe may still use: each is refused with the key that replaced it.
RENAMED = {
    "train.bf16": "train.precision (auto | bf16 | fp16 | fp32; auto picks by hardware: bf16 where the chip runs it "
                  "natively, fp16 with loss scaling on older GPUs, fp32 otherwise)",
}


class ConfigError(ValueError):
    """The resolved configuration is invalid; the message lists every problem found."""


def find_shipped(name_or_path: str | Path, folder: Path) -> Path | None:
    """A YAML file by path, or by name (with or without ``.yaml``) among those shipped in ``folder``."""
    path = Path(name_or_path)
    for candidate in (path, folder / path, folder / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """A YAML syntax error in one line, ``file:line:column: not valid YAML: what``, where the scanner's own
    message spans several lines with a caret drawing."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part)
    return f"{where}: not valid YAML: {what or str(e).splitlines()[0]}"


def read_mapping(path: Path, error: type[ValueError], expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ``error`` names the file and says what was ``expected``."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(yaml_problem(path, e)) from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a mapping with {expected}")
    return data


def shipped_names(folder: Path) -> str:
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or by name among the shipped recipes (``pipeline/recipes``)."""
    found = find_shipped(name_or_path, RECIPES_DIR)
    if found is None:
        raise ConfigError(f"recipe {str(name_or_path)!r} not found (not a file, not a shipped recipe: "
                          f"{shipped_names(RECIPES_DIR)})")
    return found


def read_recipe(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and the chain of ``base:`` recipes it extends, merged."""
    path = find_recipe(name_or_path).resolve()
    if path in _seen:
        raise ConfigError(f"recipe {path} extends itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {yaml_problem(path, e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = path.parent / base if (path.parent / base).is_file() else base
    return merge(read_recipe(base_path, _seen + (path,)), data)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``top`` wins."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "method.temperature=6"]`` to a nested dict; values parsed as YAML."""
    pairs = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        pairs[key] = yaml.safe_load(raw) if raw else None
    return nest(pairs)


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` to ``{"optim": {"lr": 0.1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load(recipe: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> dict[str, Any]:
    """Resolve a config: defaults <- recipe <- keyword sections <- dotted overrides; then validate.

    Hyperparameters follow the method: when the sections or overrides name a method other than the
    recipe's, the recipe's method hyperparameters (chosen for its own method) are dropped, and the new
    method starts from its own defaults plus what the sections and overrides set.
    """
    config = copy.deepcopy(DEFAULTS)
    recipe_data = read_recipe(recipe) if recipe is not None else {}
    later = merge(sections, parse_overrides(overrides or []))
    recipe_data = for_method(recipe_data, later.get("method", {}).get("name") if isinstance(later.get("method"), dict)
                             else None)
    config = merge(merge(config, recipe_data), later)
    return resolve_paths(validate(config))


def for_method(recipe: dict[str, Any], method_name: str | None) -> dict[str, Any]:
    """``recipe`` as it applies to ``method_name``: its method section kept only for its own method."""
    section = recipe.get("method")
    if method_name is None or not isinstance(section, dict) or section.get("name", "ce") == method_name:
        return recipe
    dropped = {k: v for k, v in section.items() if k != "name"}
    if dropped:
        log.info("method %s replaces the recipe's %s: its hyperparameters %s do not carry over; %s starts from "
                 "its defaults", method_name, section.get("name", "ce"), dropped, method_name)
    return {**recipe, "method": {"name": method_name}}


def with_method(config: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
    """A resolved config switched to ``method`` (``{"name": ..., hyperparameter: value}``), validated.

    The same rule as :func:`load`: the same method keeps its hyperparameters and takes ``method``'s
    on top; another method starts from its own defaults plus ``method``'s.
    """
    base = copy.deepcopy(config)
    name = method.get("name", base["method"]["name"])
    if name != base["method"]["name"]:
        base["method"] = {"name": name}
    base["method"].update({k: v for k, v in method.items() if k != "name"})
    return validate(base)


def resolve_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Make local paths absolute on the driver: Ray workers and Tune trials run in other directories."""
    config["data"]["path"] = storage.absolute(config["data"]["path"])
    config["train"]["storage_path"] = storage.absolute(config["train"]["storage_path"])
    # The driver's tracking store (MLFLOW_TRACKING_URI, the config, or ./mlflow.db) for every process.
    config["mlflow"]["tracking_uri"] = tracking.tracking_uri(config)
    source = config["teacher"]["source"]
    if source and Path(source).expanduser().exists():
        config["teacher"]["source"] = storage.absolute(source)
    return config


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check keys, types and values; fill method defaults. Raises ConfigError listing all problems."""
    problems: list[str] = []
    check_keys(config, DEFAULTS, "", problems)
    method_name = config.get("method", {}).get("name")
    if method_name not in methods.REGISTRY:
        problems.append(f"method.name: unknown method {method_name!r}; known: {', '.join(methods.names())}")
    else:
        hparams = {k: v for k, v in config["method"].items() if k != "name"}
        if method_name == "ce" and "standardize" in hparams:
            problems.append(f"method.standardize: logit standardization acts on distillation terms and method "
                            f"'ce' has none (got {hparams.pop('standardize')!r}); use kd, dkd or stkd")
        try:
            teacher_marker = None if method_name == "ce" else object()
            resolved = methods.validate_hparams(methods.method_class(method_name), teacher_marker, hparams)
            config["method"] = {"name": method_name, **resolved}
        except ValueError as e:
            problems.append(f"method: {e}")
        if method_name != "ce" and not config["teacher"]["source"]:
            problems.append(f"teacher.source: method {method_name!r} needs a teacher (registered model name, "
                            "models:/ URI or checkpoint path)")
        if method_name == "ce" and config["teacher"]["source"]:
            problems.append("teacher.source: method 'ce' trains without a teacher; remove teacher.source")
    student = config["model"].get("student")
    if student is not None and student not in models.names():
        problems.append(f"model.student: unknown model {student!r}; known: {', '.join(models.names())}")
    for key in ("data.path", "model.student"):
        section, name = key.split(".")
        if config[section].get(name) is None:
            problems.append(f"{key}: required")
    check_values(config, problems)
    if len(problems) == 1:
        raise ConfigError(f"invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def check_keys(config: Any, defaults: dict[str, Any], prefix: str, problems: list[str]) -> None:
    if not isinstance(config, dict):
        problems.append(f"{prefix.rstrip('.')}: must be a mapping, got {config!r}")
        return
    for key, value in config.items():
        dotted = prefix + key
        if prefix == "method.":
            continue  # method hyperparameters are checked against the method itself
        if dotted in RENAMED:
            problems.append(f"{dotted}: replaced by {RENAMED[dotted]}")
            continue
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            problems.append(f"{dotted}: unknown key (known here: {known})")
            continue
        default = defaults[key]
        if isinstance(default, dict):
            check_keys(value, default, dotted + ".", problems)
            continue
        expected = TYPES.get(dotted) or (type(default),)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if value is None and type(None) not in expected and dotted not in ("data.path", "model.student"):
            ok = False
        if not ok and value is not None:
            names = " or ".join(t.__name__ for t in expected if t is not type(None))
            problems.append(f"{dotted}: expected {names}, got {value!r} ({type(value).__name__})")


def check_values(config: dict[str, Any], problems: list[str]) -> None:
    optim, train = config["optim"], config["train"]
    check_workers(train["workers"], problems)
    positive = {"optim.lr": optim["lr"], "optim.batch_size": optim["batch_size"], "optim.epochs": optim["epochs"],
                "train.checkpoint_every": train["checkpoint_every"],
                "data.eval_batch_size": config["data"]["eval_batch_size"], "data.eval_every": config["data"]["eval_every"]}
    if config["train"]["stop_grace_s"] < 0:
        problems.append(f"train.stop_grace_s: must be >= 0 (seconds), got {config['train']['stop_grace_s']}")
    wait = config["mlflow"]["outage_wait_s"]
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait < 0:
        problems.append(f"mlflow.outage_wait_s: must be >= 0 (seconds), got {wait}")
    for key, value in positive.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{key}: must be > 0, got {value}")
    most = max_workers(train["workers"])
    if isinstance(optim["batch_size"], int) and most and optim["batch_size"] < most:
        problems.append(f"optim.batch_size ({optim['batch_size']}) is the global batch and must be >= train.workers "
                        f"({train['workers'] if most == train['workers'] else f'up to {most}'})")
    if not isinstance(optim["milestones"], list) or not all(isinstance(m, int) for m in optim["milestones"]):
        problems.append(f"optim.milestones: expected a list of epochs (integers), got {optim['milestones']!r}")
    for key in ("channels_last", "sync_bn"):
        if isinstance(train[key], str) and train[key] != "auto":
            problems.append(f"train.{key}: expected true, false or 'auto', got {train[key]!r}")
    check_precision(train, problems)
    if train["sync_bn"] is True and not train["use_gpu"]:
        problems.append("train.sync_bn: PyTorch's SyncBatchNorm runs on GPUs only; set train.use_gpu=true, or leave "
                        "train.sync_bn at 'auto' (on the CPU each worker's BatchNorm keeps its own statistics)")
    check_schedule(optim, problems)
    check_gpus(train, problems)
    check_data_parallel(config, problems)
    check_tune(config["tune"], optim, problems)
    fraction = config["data"]["val_fraction"]
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and not 0 <= fraction < 1:
        problems.append(f"data.val_fraction: must be in [0, 1), got {fraction}")


def check_schedule(optim: dict[str, Any], problems: list[str]) -> None:
    epochs, schedule = optim["epochs"], optim["schedule"]
    if schedule not in SCHEDULES:
        problems.append(f"optim.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return
    warmup = optim["warmup_epochs"]
    if isinstance(warmup, int) and not isinstance(warmup, bool) and not 0 <= warmup < epochs:
        problems.append(f"optim.warmup_epochs: must be in [0, optim.epochs={epochs}), got {warmup}")
    milestones = optim["milestones"]
    if schedule == "multistep" and isinstance(milestones, list) and all(isinstance(m, int) for m in milestones):
        late = [m for m in milestones if not 0 < m < epochs]
        if late:
            problems.append(f"optim.milestones: {late} not within the {epochs} epochs (each must be in "
                            f"1..{epochs - 1}); scale them with optim.epochs or use optim.schedule=cosine")
        if milestones != sorted(milestones):
            problems.append(f"optim.milestones: must be increasing, got {milestones}")


def check_precision(train: dict[str, Any], problems: list[str]) -> None:
    """Refuse what the training device cannot run, before Ray starts. Without ``train.use_gpu`` the
    workers train on CPUs like the driver's, so its CPU answers for bf16; a GPU's capability is known only
    on its worker, which refuses there (``stkd.precision.resolve_for_device``)."""
    requested = train["precision"]
    if requested not in precision.PRECISIONS:
        problems.append(f"train.precision: expected one of {', '.join(precision.PRECISIONS)}, got {requested!r}")
        return
    if train["use_gpu"] is True:
        return
    try:
        precision.resolve_precision(requested, "cpu", cpu_native_bf16=precision.cpu_has_native_bf16(),
                                    device_name=f"{precision.cpu_name()} (train.use_gpu=false)")
    except precision.PrecisionError as e:
        problems.append(str(e))


def check_gpus(train: dict[str, Any], problems: list[str]) -> None:
    """NCCL refuses two ranks of one job on the same GPU: fractional GPUs only for one-worker runs."""
    workers, share = max_workers(train["workers"]), train["gpus_per_worker"]
    if (train["use_gpu"] is True and workers is not None and workers > 1
            and isinstance(share, (int, float)) and share < 1):
        problems.append(f"train.gpus_per_worker: {share} with train.workers={workers} would put two ranks of one run "
                        "on one GPU, which NCCL refuses (\"Duplicate GPU detected\"); use train.gpus_per_worker=1 "
                        "with several workers, or train.workers=1 to share GPUs between trials")
    if isinstance(share, (int, float)) and not isinstance(share, bool) and share <= 0:
        problems.append(f"train.gpus_per_worker: a fraction of one GPU in (0, 1], got {share}")
    elif isinstance(share, (int, float)) and not isinstance(share, bool) and share > 1:
        # A worker trains on ray.train.torch.get_device(), the first of its GPUs: the others would sit idle.
        problems.append(f"train.gpus_per_worker: {share} GPUs per worker, but each worker trains on one GPU and "
                        f"would leave the other {share - 1:g} idle; for several GPUs use one worker per GPU "
                        f"(train.workers=<GPUs> train.gpus_per_worker=1), or a fraction to share a GPU")


def check_data_parallel(config: dict[str, Any], problems: list[str]) -> None:
    """SyncBatchNorm with ``torch.compile``, and a streamed global batch that does not divide over the workers.

    ``train.sync_bn`` counts as on when it is ``true``, or ``auto`` where it resolves on (GPUs, several workers,
    a per-GPU batch below ``pipeline.data.feeds.SYNC_BN_BELOW``; ``pipeline.train.worker_loop.resolve_sync_bn``)
    at any world size the run may train at (``train.workers: [min, max]``: each from min to max).
    The streaming feed gives every worker ``optim.batch_size // world size`` rows a step; a batch that does
    not divide would silently train with a smaller global batch than the learning rate was chosen for.
    """
    from pipeline.data.feeds import per_worker_batch, sync_bn_pays

    train, batch = config["train"], config["optim"]["batch_size"]
    span = worker_range(train["workers"])
    if span is None or not isinstance(batch, int) or isinstance(batch, bool):
        return
    worlds = range(span[0], span[1] + 1)
    auto = [w for w in worlds if train["sync_bn"] == "auto" and train["use_gpu"] is True and w > 1
            and sync_bn_pays(per_worker_batch(batch, w))]
    if (train["sync_bn"] is True or auto) and train["compile"] is True:
        why = "" if train["sync_bn"] is True else (f" (auto: {per_worker_batch(batch, auto[-1])} samples per GPU "
                                                   f"with {auto[-1]} workers, where synchronizing pays)")
        problems.append(f"train.sync_bn and train.compile: SyncBatchNorm is on{why}, and torch.compile does not "
                        "trace SyncBatchNorm's collectives; set train.sync_bn=false or train.compile=false")
    uneven = [w for w in worlds if w > 1 and batch >= w and batch % w]
    if config["data"]["in_memory"] is False and uneven:
        step = math.lcm(*(w for w in worlds if w > 1))
        lower, upper = batch - batch % step, batch - batch % step + step
        over = f"train.workers={train['workers']}" + (f" ({uneven[0]} workers)" if span[0] != span[1] else "")
        use = " or ".join(str(b) for b in (lower, upper) if b > 0)
        problems.append(f"optim.batch_size: the global batch {batch} does not divide over {over}, and the streaming "
                        f"feed (data.in_memory=false) gives every worker the same batch; use {use}")


def worker_range(workers: Any) -> tuple[int, int] | None:
    """``train.workers`` as ``(min, max)``: ``n`` is ``(n, n)``, ``[min, max]`` elastic; None when invalid."""
    if isinstance(workers, int) and not isinstance(workers, bool):
        return (workers, workers) if workers >= 1 else None
    if (isinstance(workers, (list, tuple)) and len(workers) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in workers) and 1 <= workers[0] <= workers[1]):
        return workers[0], workers[1]
    return None


def max_workers(workers: Any) -> int | None:
    """The most workers a run trains with (None when ``train.workers`` is invalid)."""
    span = worker_range(workers)
    return span[1] if span else None


def scaling_workers(workers: int | list[int]) -> int | tuple[int, int]:
    """``train.workers`` as Ray Train's ``ScalingConfig(num_workers=...)`` takes it: an int, or a
    ``(min, max)`` tuple (elastic; a pair with min == max is the fixed group it describes)."""
    low, high = worker_range(workers)
    return low if low == high else (low, high)


def workers_label(workers: int | list[int]) -> str:
    """``2``, or ``1-2`` for an elastic range: the run's tag and log line."""
    low, high = worker_range(workers) or (workers, workers)
    return str(low) if low == high else f"{low}-{high}"


def check_workers(workers: Any, problems: list[str]) -> None:
    if isinstance(workers, bool) or not isinstance(workers, (int, list)):
        return  # check_keys reported the type
    if isinstance(workers, int):
        if workers < 1:
            problems.append(f"train.workers: must be > 0, got {workers}")
        return
    if len(workers) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in workers):
        problems.append(f"train.workers: a number of workers, or [min, max] (two integers) for an elastic group "
                        f"that goes on with the workers left when a node is lost; got {workers!r}")
    elif workers[0] < 1:
        problems.append(f"train.workers: [min, max] needs min >= 1, got {workers}")
    elif workers[0] > workers[1]:
        problems.append(f"train.workers: [min, max] needs min <= max, got {workers}")


def check_tune(tune: dict[str, Any], optim: dict[str, Any], problems: list[str]) -> None:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if number(tune["max_concurrent"]) and tune["max_concurrent"] < 1:
        problems.append(f"tune.max_concurrent: must be >= 1 (or null: every trial), got {tune['max_concurrent']}")
    if number(tune["resource_timeout_s"]) and tune["resource_timeout_s"] <= 0:
        problems.append(f"tune.resource_timeout_s: must be > 0 seconds, got {tune['resource_timeout_s']}")
    if number(tune["max_failures"]) and tune["max_failures"] < -1:
        problems.append(f"tune.max_failures: retries of a failed trial, >= 0 (-1: without end), "
                        f"got {tune['max_failures']}")
    if number(tune["reduction_factor"]) and tune["reduction_factor"] < 2:
        problems.append(f"tune.reduction_factor: ASHA keeps 1 in reduction_factor trials per rung, must be >= 2, "
                        f"got {tune['reduction_factor']}")
    grace, epochs = tune["grace_period"], optim["epochs"]
    if number(grace) and number(epochs) and not 1 <= grace <= epochs:
        problems.append(f"tune.grace_period: ASHA's first rung must be within the {epochs} epochs, got {grace}")


def with_epochs(overrides: list[str], config: dict[str, Any], epochs: int) -> list[str]:
    """Overrides that set ``optim.epochs`` and move the milestones with it (the same fractions of the run)."""
    old = config["optim"]["epochs"]
    milestones = sorted({min(max(1, round(m * epochs / old)), epochs - 1) for m in config["optim"]["milestones"]})
    if epochs < 2:
        milestones = []
    return [*overrides, f"optim.epochs={epochs}", f"optim.milestones={milestones}"]


def run_label(config: dict[str, Any], teacher_model: str | None = None) -> str:
    """What a run is, readable in a list of runs: method, teacher -> student, seed
    (``stkd-wrn_16_2-resnet8-s0``; ``ce-resnet8-s0`` without a teacher)."""
    models = [teacher_model, config["model"]["student"]] if teacher_model else [config["model"]["student"]]
    return "-".join([config["method"]["name"], *models, f"s{config['train']['seed']}"])


def new_run_name(config: dict[str, Any], teacher_model: str | None = None) -> str:
    """``train.run_name``, or the run's label and a short random id: a name no earlier run has,
    since Ray resumes any run whose (storage_path, name) already exists."""
    return config["train"]["run_name"] or f"{run_label(config, teacher_model)}-{uuid.uuid4().hex[:4]}"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` to ``{"optim.lr": 0.1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
