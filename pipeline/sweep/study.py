"""``stkd study``: a paper's table in one command.

A study spec (YAML, ``studies/``) names a grid of pairs (recipes, each with its teacher
and student) x methods (a label for each method with its variant's hyperparameters) x seeds. Every
cell is one Ray Tune trial training one run with its validation split; each pair's teacher is loaded
and put into the object store once and shared by all its trials. The result is one MLflow parent run
holding the table (mean +- std of test top-1 at the selected and at the last epoch, per pair and
method, the teacher and the CE student beside them), a plot, and every run's figures. An
interrupted study resumes like a sweep: finished runs are not run again.

A spec::

    description: what the study asks
    pairs: [cifar10_resnet56_resnet20]       # recipes (shipped names or paths)
    methods:                                 # label -> method; hyperparameters follow the method
      ce: {name: ce}
      kd: {name: kd}
      stkd-std: {name: stkd, standardize: true}
    seeds: [0, 1, 2]
    overrides: {data.val_fraction: 0.1}      # dotted keys for every run (optional)
    tune:                                    # optional: tune every (pair, label) first, then run the seeds
      samples: 6                             # trials per (pair, label), >= 1: the same for every label
      scheduler: asha                        # fifo (the default) or asha (one ASHA per (pair, label))
      epochs: 30                             # optional: the tuning budget (default: the seed runs' optim.epochs);
                                             # multistep milestones move with it (config.with_epochs)
      spaces:                                # optional, per label: a shipped space name or a path;
        stkd-std: path/to/space.yaml         # default: the label's method's shipped space (tune_spaces/<method>.yaml)

**Tuning** (with a ``tune:`` section) is a stage before the seeds: one Tune experiment
(``<study dir>/tuning``) runs ``samples`` trials for every (pair, label), each the label's cell config
(on the first seed, at the tuning budget) with hyperparameters drawn from its space on top
(``search_space.apply``, as ``stkd tune``). The draws are made once, before the first trial, and kept in
the study's state file, so a resumed stage runs the very trials it started with (:func:`draw_samples`). The label's fixed hyperparameters (those its ``methods:``
entry sets) stay fixed: a space that searches one is refused, as is a space of another method than the
label's, and a ``grid`` distribution (it would give one label more trials than another). Each label's
winner is its trial with the best validation top-1 at its selected epoch (``selected/val_top1``, the
sweeps' selection metric; errored trials are left out, ties go to the earlier trial); test accuracy is
not read to choose. The winners are kept in the study's state file (``trials.SWEEP_FILE``), so
``--resume`` never runs a finished tuning stage again, and the seed runs then train with them. Every
tuning trial and seed run is a child of the study's parent run, tagged ``stage=tune`` or ``stage=seeds``;
the table states the budget (trials x epochs per label) and each label's chosen hyperparameters and
best tuning validation top-1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import re
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


from pipeline import ROOT, config as config_lib, stopping, storage, tracking
from pipeline.sweep import space as search_space, progress as sweep_progress, trials
from pipeline.train import run as run_lib

log = logging.getLogger(__name__)

STUDIES_DIR = ROOT / "studies"
LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")  # what MLflow accepts in a metric name
TUNE_KEYS = ("samples", "scheduler", "epochs", "spaces")
SCHEDULERS = ("fifo", "asha")
TUNING_DIR = "tuning"  # the tuning stage's Tune experiment, inside the study's folder


class StudyError(config_lib.ConfigError):
    """A study spec is invalid; the message names the file and the key."""


def find_study(name_or_path: str | Path) -> Path:
    found = config_lib.find_shipped(name_or_path, STUDIES_DIR)
    if found is None:
        raise StudyError(f"study {str(name_or_path)!r} not found (shipped: {config_lib.shipped_names(STUDIES_DIR)})")
    return found


def load_study(name_or_path: str | Path, overrides: list[str] | None = None,
               seeds: list[int] | None = None) -> dict[str, Any]:
    """Read and check a spec, and resolve every cell's config before anything is scheduled; ``seeds``
    replaces the spec's seeds.

    Returns ``{"file", "name", "description", "pairs", "methods", "seeds", "configs", "tune",
    "tune_configs"}`` where ``configs[(pair, label, seed)]`` is the validated config of that run;
    with a ``tune:`` section, ``tune`` is ``{"samples", "scheduler", "epochs", "spaces": {label: space}}``
    and ``tune_configs[(pair, label)]`` the config each of that label's tuning trials starts from
    (both None and empty without one).
    """
    path = find_study(name_or_path)
    where = str(path)
    spec = config_lib.read_mapping(path, StudyError, "pairs, methods and seeds")
    pairs, method_specs, seeds = check_spec(where, spec, seeds)
    tuning = load_tuning(where, spec["tune"], method_specs) if "tune" in spec else None
    common = [f"{k}={json.dumps(v)}" for k, v in (spec.get("overrides") or {}).items()] + list(overrides or [])

    configs: dict[tuple[str, str, int], dict[str, Any]] = {}
    tune_configs: dict[tuple[str, str], dict[str, Any]] = {}
    for pair in pairs:
        base, tune_base = pair_bases(where, pair, common, tuning)
        for label, method in method_specs.items():
            for seed in seeds:
                configs[(pair, label, seed)] = cell_config(where, base, pair, label, method, seed)
            if tuning:  # on the first seed; the seeds then run with the winner
                tune_configs[(pair, label)] = cell_config(where, tune_base, pair, label, method, seeds[0])
    return {"file": where, "name": path.stem, "description": spec.get("description", ""), "pairs": pairs,
            "methods": method_specs, "seeds": seeds, "configs": configs, "tune": tuning,
            "tune_configs": tune_configs}


def check_spec(where: str, spec: dict[str, Any], seeds: list[int] | None) -> tuple[list, dict, list]:
    """The spec's pairs, method labels and seeds (``seeds`` replacing its own), each checked."""
    unknown = set(spec) - {"description", "pairs", "methods", "seeds", "overrides", "tune"}
    if unknown:
        raise StudyError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                         "expected description, pairs, methods, seeds, overrides, tune")
    pairs, method_specs = spec.get("pairs"), spec.get("methods")
    seeds = spec.get("seeds") if seeds is None else seeds
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
        raise StudyError(f"{where}: pairs: expected a non-empty list of recipe names, got {pairs!r}")
    if len({pair_name(p) for p in pairs}) != len(pairs):
        raise StudyError(f"{where}: pairs: two recipes share a name: {pairs}")
    if not isinstance(method_specs, dict) or not method_specs:
        raise StudyError(f"{where}: methods: expected a mapping label -> {{name: method, ...}}, got {method_specs!r}")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise StudyError(f"{where}: seeds: expected a non-empty list of distinct integers, got {seeds!r}")
    for label, method in method_specs.items():
        if not isinstance(label, str) or not LABEL.match(label):
            raise StudyError(f"{where}: methods: label {label!r} may hold only letters, digits, '_', '.' and '-'")
        if not isinstance(method, dict) or "name" not in method:
            raise StudyError(f"{where}: methods.{label}: expected {{name: method, hyperparameter: value, ...}}, "
                             f"got {method!r}")
    if not isinstance(spec.get("overrides") or {}, dict):
        raise StudyError(f"{where}: overrides: expected a mapping of dotted keys, got {spec['overrides']!r}")
    return pairs, method_specs, seeds


def pair_bases(where: str, pair: str, common: list[str],
               tuning: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pair's config for its seed runs and for its tuning trials (the same unless ``tune.epochs`` differs)."""
    try:
        base = config_lib.load(pair, common)
    except config_lib.ConfigError as e:
        raise StudyError(f"{where}: pair {pair!r}: {e}") from None
    if base["method"]["name"] != "ce" and not base["teacher"]["source"]:
        raise StudyError(f"{where}: pair {pair!r} names no teacher (teacher.source)")
    base = trials.with_validation_split(base)
    if not tuning or tuning["epochs"] is None:
        return base, base
    try:
        tune_base = config_lib.load(pair, config_lib.with_epochs(common, base, tuning["epochs"]))
    except config_lib.ConfigError as e:
        raise StudyError(f"{where}: tune.epochs: pair {pair!r} at {tuning['epochs']} epoch(s): {e}") from None
    return base, trials.with_validation_split(tune_base)


def cell_config(where: str, base: dict[str, Any], pair: str, label: str, method: dict[str, Any],
                seed: int) -> dict[str, Any]:
    cell = config_lib.merge(base, {"train": {"seed": seed}})
    if method["name"] == "ce":
        cell["teacher"]["source"] = None
    try:
        return config_lib.with_method(cell, method)
    except config_lib.ConfigError as e:
        raise StudyError(f"{where}: methods.{label} on pair {pair!r}: {e}") from None


def load_tuning(where: str, section: Any, method_specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Check a spec's ``tune:`` section and load every label's space; a StudyError names the key."""
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(section, dict):
        raise StudyError(f"{where}: tune: expected a mapping {{samples: N, scheduler: fifo|asha, epochs: N, "
                         f"spaces: {{label: space}}}}, got {section!r}")
    unknown = set(section) - set(TUNE_KEYS)
    if unknown:
        raise StudyError(f"{where}: tune: unknown key(s) {sorted(map(str, unknown))}; expected {', '.join(TUNE_KEYS)}")
    samples = section.get("samples")
    if not integer(samples) or samples < 1:
        raise StudyError(f"{where}: tune.samples: trials per method label, an integer >= 1, got {samples!r}")
    scheduler = section.get("scheduler", "fifo")
    if scheduler not in SCHEDULERS:
        raise StudyError(f"{where}: tune.scheduler: one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    epochs = section.get("epochs")
    if epochs is not None and (not integer(epochs) or epochs < 1):
        raise StudyError(f"{where}: tune.epochs: the tuning budget, an integer >= 1 (or absent: the seed runs' "
                         f"optim.epochs), got {epochs!r}")
    named = section.get("spaces") or {}
    if not isinstance(named, dict):
        raise StudyError(f"{where}: tune.spaces: expected a mapping label -> space (name or path), got {named!r}")
    for label in named:
        if label not in method_specs:
            raise StudyError(f"{where}: tune.spaces.{label}: not a label of methods "
                             f"({', '.join(map(str, method_specs))})")
    spaces = {label: label_space(where, label, method, named) for label, method in method_specs.items()}
    return {"samples": samples, "scheduler": scheduler, "epochs": epochs, "spaces": spaces}


def label_space(where: str, label: str, method: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """The space a label is tuned in (``tune.spaces.<label>``, else its method's shipped one), checked to train
    the label's method, to give it no grid and to leave the label's fixed hyperparameters alone."""
    key = f"tune.spaces.{label}"
    name = named.get(label, method["name"])
    if not isinstance(name, str):
        raise StudyError(f"{where}: {key}: expected a space name or path, got {name!r}")
    try:
        space = search_space.load_space(name)
    except search_space.SpaceError as e:
        default = "" if label in named else f" (the default: method {method['name']!r}'s shipped space)"
        raise StudyError(f"{where}: {key}{default}: {e}") from None
    if space["method"] != method["name"]:
        raise StudyError(f"{where}: {key}: space {space['file']} trains method {space['method']!r}, but label "
                         f"{label!r} is method {method['name']!r}")
    grid = [k for k, s in space["parameters"].items() if s["distribution"] == "grid"]
    if grid:
        raise StudyError(f"{where}: {key}: {grid[0]}: a grid multiplies one label's trials, and a study gives "
                         "every label the same tune.samples trials; use distribution: choice")
    fixed = sorted({f"method.{k}" for k in method if k != "name"} & set(space["parameters"]))
    if fixed:
        raise StudyError(f"{where}: {key}: space {space['file']} searches {', '.join(fixed)}, which "
                         f"methods.{label} fixes; drop it from methods.{label} or give the label a space "
                         "without it")
    return space


def pair_name(pair: str) -> str:
    """A pair's name in tables and metric names: its recipe's file stem."""
    return Path(pair).stem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="study YAML path or shipped name (studies/)")
    parser.add_argument("--name", help="study name (default: a new unique one); with --resume, the study to resume")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted study (the latest one of this "
                                                               "spec unless --name says which)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="runs training at once (default: tune.max_concurrent, else every run)")
    parser.add_argument("--resource-timeout", type=float, default=None, metavar="SECONDS",
                        help="end the study when runs wait this long for resources and none progresses "
                             "(default: tune.resource_timeout_s, 1800)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, section.key=value")


def study_trial(params: dict[str, Any], *, configs: dict, teachers: dict, study_name: str,
                parent_run_id: str, study_dir: str) -> None:
    """One cell of the grid: one run of one method on one pair with one seed."""
    pair, label, seed = params["cell"]
    config = config_lib.merge(configs[(pair, label, seed)], {})
    teacher = teachers.get(pair) if config["method"]["name"] != "ce" else None
    trials.train_trial(config, teacher, parent_run_id, study_dir,
                     {"study": study_name, "pair": pair, "variant": label, "stage": "seeds"})


def tuning_trial(params: dict[str, Any], *, configs: dict, samples: list[dict[str, Any]], teachers: dict,
                 study_name: str, parent_run_id: str, tuning_dir: str) -> None:
    """One tuning trial: a label's tuning config with its drawn hyperparameters on top."""
    pair, label, index = params["cell"]
    config = search_space.apply(configs[(pair, label)], samples[index]["params"])
    teacher = teachers.get(pair) if config["method"]["name"] != "ce" else None
    trials.train_trial(config, teacher, parent_run_id, tuning_dir,
                     {"study": study_name, "pair": pair, "variant": label, "stage": "tune"})


def draw_samples(study: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """Every tuning trial's hyperparameters, drawn up front from its label's space: ``{"cell": [pair, label],
    "params": {dotted key: value}}``, ``samples`` per (pair, label), in the order of ``tune_configs``.

    Drawn here and kept in the study's state, not by Tune: a ``tune.sample_from`` is drawn again whenever
    Tune restores the trial (its function placeholders are re-sampled on every restore), so a resumed
    trial would go on with other hyperparameters than it started with, and a finished one would report
    other ones than it trained with."""
    import numpy as np

    rng = np.random.default_rng(seed)
    drawn = []
    for pair, label in study["tune_configs"]:
        domains = search_space.to_tune(study["tune"]["spaces"][label]["parameters"])
        for _ in range(study["tune"]["samples"]):
            values = {k: d.sample(random_state=rng) for k, d in domains.items()}
            drawn.append({"cell": [pair, label],
                          "params": {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}})
    return drawn


def tuning_space(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The tuning stage's Tune param_space: one grid point per drawn trial, ``[pair, label, index]``."""
    from ray import tune as ray_tune

    return {"cell": ray_tune.grid_search([[*s["cell"], i] for i, s in enumerate(samples)])}


def per_cell_scheduler(schedulers: dict[tuple[str, str], Any]):
    """One scheduler per (pair, label) behind one TrialScheduler: ASHA compares a label's trials with
    each other, never a CE trial with a KD one."""
    from ray.tune.schedulers import FIFOScheduler

    class PerCell(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.schedulers = schedulers

        def of(self, trial):
            return self.schedulers[tuple(trial.config["cell"][:2])]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

        def on_trial_add(self, tune_controller, trial):
            self.of(trial).on_trial_add(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self.of(trial).on_trial_error(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self.of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self.of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self.of(trial).on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "\n".join(f"{cell}: {s.debug_string()}" for cell, s in self.schedulers.items())

    return PerCell()


def choose_winners(results: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (pair, label)'s best tuning trial by validation top-1 at its selected epoch.

    ``results``: ``{"cell": (pair, label), "params": {...}, "metrics": {...}, "error": bool}`` per trial.
    Only ``selected/val_top1`` (and ``trial_id``) of the metrics is read, never a test metric; errored
    trials and trials without a validation result are left out; ties go to the earlier trial.
    """
    winners: dict[tuple[str, str], dict[str, Any]] = {}
    finished: dict[tuple[str, str], int] = {}
    for trial in results:
        metrics = trial["metrics"] or {}
        if trial.get("error") or trials.SELECTED_VAL not in metrics:
            continue
        cell, value = tuple(trial["cell"]), float(metrics[trials.SELECTED_VAL])
        finished[cell] = finished.get(cell, 0) + 1
        if cell not in winners or value > winners[cell]["val_top1"]:
            winners[cell] = {"pair": cell[0], "method": cell[1], "params": dict(trial["params"]), "val_top1": value,
                             "trial_id": metrics.get("trial_id", "")}
    for cell, winner in winners.items():
        winner["trials"] = finished[cell]
    return winners


def with_winners(study: dict[str, Any], tuning: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The seed runs' configs with each (pair, label)'s tuned hyperparameters."""
    chosen = {(w["pair"], w["method"]): w["params"] for w in tuning}
    return {cell: search_space.apply(config, chosen[cell[:2]]) for cell, config in study["configs"].items()}


def run_study(study: dict[str, Any], name: str | None = None, resume: bool = False,
              max_concurrent: int | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) a study: its tuning stage (with a ``tune:`` section, unless a resumed study
    finished it), then the seeds; returns the summary (rows, table, files, parent run, tuning).

    ``parent_run_id``: an MLflow run this process has open and active (the demo's, which holds its
    teacher's run too) to hold the study's runs, table and plot, in place of a parent run of its own."""
    from ray import tune as ray_tune

    configs = study["configs"]
    first = next(iter(configs.values()))
    storage_path = first["train"]["storage_path"]
    name = name or (trials.latest_sweep(storage_path, f"study-{study['name']}-") if resume else None) \
        or trials.new_sweep_name(f"study-{study['name']}")
    study_dir = f"{storage_path.rstrip('/')}/{name}"
    state_file = f"{study_dir}/{trials.SWEEP_FILE}"
    state = json.loads(storage.read_text(state_file) or "{}") if resume else {}
    if resume and not state and not ray_tune.Tuner.can_restore(study_dir):
        raise StudyError(f"no study to resume at {study_dir}")
    teachers = datasets_and_teachers(study)
    uri = tracking.tracking_uri(first)
    holder = parent_run(study, name, uri, first["mlflow"]["experiment"], parent_run_id, state)
    with holder as parent_run_id:
        state = {**state, "parent_run_id": parent_run_id}
        storage.write_text(state_file, json.dumps(state))
        tuning = None
        if study["tune"]:
            tuning = state.get("tuning")
            if tuning is None:
                state = {**state, "tuning_samples": state.get("tuning_samples") or draw_samples(study)}
                storage.write_text(state_file, json.dumps(state))  # before any trial: a resume runs the same ones
                tuning = run_tuning(study, teachers, name, parent_run_id, study_dir, resume, max_concurrent,
                                    state["tuning_samples"])
                state = {**state, "tuning": tuning}
                storage.write_text(state_file, json.dumps(state))  # a resumed study never tunes again
                log_tuning(uri, parent_run_id, tuning)
            else:
                log.info("study %s: the tuning stage finished before; seeds run with its winners", name)
            configs = with_winners(study, tuning)
        results = run_seeds(study, configs, teachers, name, parent_run_id, study_dir, resume, max_concurrent)
        return summarize(study, results, teachers, name, parent_run_id, uri, storage_path, tuning)


def datasets_and_teachers(study: dict[str, Any]) -> dict[str, run_lib.Teacher]:
    """Every pair's dataset checked (each dataset's checksums once), Ray started, and each pair's teacher
    loaded and shared: one load and one object per teacher, however many pairs share it."""
    configs = study["configs"]
    # A pair's config that names its teacher (any of its configs when none does: a study of CE students).
    pair_configs = {pair: next((c for (p, _, _), c in configs.items() if p == pair and c["teacher"]["source"]),
                               next(c for (p, _, _), c in configs.items() if p == pair)) for pair in study["pairs"]}
    infos, checked = {}, set()
    for pair, cfg in pair_configs.items():  # refuses a bad split early
        path = cfg["data"]["path"]
        infos[pair] = run_lib.dataset_info(cfg, verify=path not in checked)
        checked.add(path)
    run_lib.ensure_ray()
    teachers, by_source = {}, {}
    for pair, cfg in pair_configs.items():
        source = cfg["teacher"]["source"]
        if source:
            if source not in by_source:
                by_source[source] = run_lib.load_teacher(cfg, infos[pair])
            teachers[pair] = by_source[source]
    return teachers


def parent_run(study: dict[str, Any], name: str, uri: str, experiment: str, parent_run_id: str | None,
               state: dict[str, Any]):
    """A context manager giving the MLflow run that holds the study's runs: its own (reopened on resume), or
    ``parent_run_id``, the caller's open run (which the caller ends; the study adds its tags and params)."""
    from mlflow.entities import Param

    params = {"spec": study["file"], "pairs": json.dumps(study["pairs"]), "methods": json.dumps(study["methods"]),
              "seeds": json.dumps(study["seeds"])}
    if study["tune"]:
        params.update({"tune.samples": study["tune"]["samples"], "tune.scheduler": study["tune"]["scheduler"],
                       "tune.epochs": tuning_epochs(study),
                       "tune.spaces": json.dumps({k: s["file"] for k, s in study["tune"]["spaces"].items()})})
    tags = {"study": name, "mlflow.note.content": study["description"]}
    if parent_run_id:
        tracking.set_tags(uri, parent_run_id, tags)
        tracking.client(uri).log_batch(parent_run_id, params=[Param(k, str(v)[:tracking.MAX_PARAM_LENGTH])
                                                                  for k, v in params.items()])
        return contextlib.nullcontext(parent_run_id)
    return tracking.tracked_run(uri, experiment, name, params if not state else {}, tags,
                                resume_run_id=state.get("parent_run_id"))


def tuning_epochs(study: dict[str, Any]) -> str:
    """The tuning budget in epochs (one number, or each pair's when their recipes differ)."""
    return "/".join(str(e) for e in sorted({c["optim"]["epochs"] for c in study["tune_configs"].values()}))


def run_tuning(study: dict[str, Any], teachers: dict, name: str, parent_run_id: str, study_dir: str, resume: bool,
               max_concurrent: int | None, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tuning stage: the drawn ``samples`` (:func:`draw_samples`) as one Tune experiment; returns the
    winners."""
    from ray import tune as ray_tune

    spec, configs = study["tune"], study["tune_configs"]
    first = next(iter(configs.values()))
    tuning_dir = f"{study_dir}/{TUNING_DIR}"
    uri, experiment = tracking.tracking_uri(first), first["mlflow"]["experiment"]
    trainable = functools.partial(tuning_trial, configs=configs, samples=samples, teachers=teachers,
                                  study_name=name, parent_run_id=parent_run_id, tuning_dir=tuning_dir)
    trainable = ray_tune.with_resources(trainable, {"CPU": trials.TRIAL_CPU})
    count = spec["samples"] * len(configs)
    concurrent = trials.concurrency(first, count, max_concurrent, trials.fixed_cluster())
    epochs = max(c["optim"]["epochs"] for c in configs.values())
    progress = sweep_progress.Progress(trials.SELECTED_VAL, epochs, trials.trial_resources(first),
                                       first["tune"]["resource_timeout_s"])
    if resume and ray_tune.Tuner.can_restore(tuning_dir):
        tuner = trials.restore(tuning_dir, trainable, tuning_space(samples), first, progress)
    else:
        scheduler = None
        if spec["scheduler"] == "asha":
            scheduler = per_cell_scheduler({
                cell: trials.make_scheduler("asha", config, (uri, experiment, parent_run_id),
                                            metric=spec["spaces"][cell[1]]["metric"], mode="max",
                                            state_file=f"{tuning_dir}/{pair_name(cell[0])}-{cell[1]}-"
                                                       f"{trials.ASHA_STATE}")
                for cell, config in configs.items()})
        tuner = ray_tune.Tuner(
            trainable, param_space=tuning_space(samples),
            tune_config=ray_tune.TuneConfig(scheduler=scheduler,
                                            max_concurrent_trials=concurrent),
            run_config=trials.run_config(first, TUNING_DIR, study_dir, progress))
    log.info("study %s, tuning: %d trial(s) (%d per method label on each of %d pair(s)) x %s epoch(s), %s, up to "
             "%d at once", name, count, spec["samples"], len(study["pairs"]), tuning_epochs(study),
             spec["scheduler"], concurrent)
    results = trials.fit(tuner, progress, f"study {name} (tuning)", "--resource-timeout SECONDS",
                         (uri, experiment, parent_run_id), epochs, stopping.continue_command(resume_name=name))
    return tuning_winners(results, configs, samples, name)


def tuning_winners(results, configs: dict, samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Each (pair, label)'s best tuning trial by validation top-1, in the order of ``configs``; a
    RuntimeError naming the labels none of whose trials finished."""
    reported = []
    for result in results:
        if not result.config:  # a trial stopped before its first report: nothing to choose from
            continue
        pair, label, index = result.config["cell"]
        reported.append({"cell": (pair, label), "params": samples[index]["params"],
                         "metrics": result.metrics, "error": result.error is not None})
    winners = choose_winners(reported)
    missing = [cell for cell in configs if cell not in winners]
    if missing:
        errors = [str(r.error).strip().splitlines()[-1] for r in results
                  if r.error is not None and r.config and tuple(r.config["cell"][:2]) in missing]
        which = ", ".join(f"{label} on {pair_name(pair)}" for pair, label in missing)
        raise RuntimeError(f"study {name}: no tuning trial of {which} finished"
                           + (f"; first error: {errors[0]}" if errors else ""))
    for (pair, label), w in winners.items():
        log.info("study %s: %s on %s tuned: validation top-1 %.2f with %s (best of %d)", name, label, pair_name(pair),
                 w["val_top1"], w["params"], w["trials"])
    return [winners[cell] for cell in configs]


def log_tuning(uri: str, parent_run_id: str, tuning: list[dict[str, Any]]) -> None:
    """Each label's winner on the parent run: its validation top-1 and its hyperparameters (tags)."""
    metrics, tags = {}, {}
    for w in tuning:
        key = f"{pair_name(w['pair'])}/{w['method']}"
        metrics[f"{key}/tune_best_val_top1"] = w["val_top1"]
        tags.update({f"tuned.{key}.{k}": v for k, v in w["params"].items()})
    tracking.log_metrics(uri, parent_run_id, metrics, 0)
    tracking.set_tags(uri, parent_run_id, tags)


def run_seeds(study: dict[str, Any], configs: dict, teachers: dict, name: str, parent_run_id: str, study_dir: str,
              resume: bool, max_concurrent: int | None):
    """The seed runs: every (pair, label, seed) as a Tune trial; returns Tune's results."""
    from ray import tune as ray_tune

    first = next(iter(configs.values()))
    storage_path = first["train"]["storage_path"]
    uri, experiment = tracking.tracking_uri(first), first["mlflow"]["experiment"]
    cells = sorted(configs, key=lambda k: (k[2], study["pairs"].index(k[0]), list(study["methods"]).index(k[1])))
    epochs = max(c["optim"]["epochs"] for c in configs.values())
    trainable = functools.partial(study_trial, configs=configs, teachers=teachers, study_name=name,
                                  parent_run_id=parent_run_id, study_dir=study_dir)
    trainable = ray_tune.with_resources(trainable, {"CPU": trials.TRIAL_CPU})
    concurrent = trials.concurrency(first, len(cells), max_concurrent, trials.fixed_cluster())
    progress = sweep_progress.Progress(trials.SELECTED_VAL, epochs, trials.trial_resources(first),
                                       first["tune"]["resource_timeout_s"])
    param_space = {"cell": ray_tune.grid_search([list(c) for c in cells])}
    if resume and ray_tune.Tuner.can_restore(study_dir):
        tuner = trials.restore(study_dir, trainable, param_space, first, progress)
    else:
        tuner = ray_tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray_tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=trials.run_config(first, name, storage_path, progress))
    log.info("study %s: %d runs (%d pair(s) x %d method(s) x %d seed(s)), up to %d at once", name, len(cells),
             len(study["pairs"]), len(study["methods"]), len(study["seeds"]), concurrent)
    return trials.fit(tuner, progress, f"study {name}", "--resource-timeout SECONDS",
                      (uri, experiment, parent_run_id), epochs, stopping.continue_command(resume_name=name))


def run_rows(results) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished run; the errors of the others."""
    rows, errors = [], []
    for result in results:
        pair, label, seed = result.config["cell"]
        m = result.metrics or {}
        if result.error is not None or "selected/test_top1" not in m:
            errors.append(f"{label} on {pair}, seed {seed}: "
                          + (str(result.error).strip().splitlines()[-1] if result.error else "no result"))
            continue
        rows.append({"pair": pair_name(pair), "method": label, "seed": seed, "test_top1_selected": m["selected/test_top1"],
                     "test_top1_last": m["test/top1"], "val_top1_selected": m["selected/val_top1"],
                     "ece_selected": m.get("selected/test_ece", float("nan")),
                     "selected_epoch": int(m["selected/epoch"]) + 1, "epochs": int(m["epoch"]) + 1,
                     "run_name": result.path.rsplit("/", 1)[-1]})
    return rows, errors


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(study: dict[str, Any], rows: list[dict[str, Any]], teachers: dict) -> list[dict[str, Any]]:
    """Per pair: the teacher, then each method: n, mean and std of test top-1 at the selected and last epochs."""
    table = []
    for pair in study["pairs"]:
        teacher, name = teachers.get(pair), pair_name(pair)
        if teacher is not None:
            table.append({"pair": name, "method": f"teacher {teacher.spec['name']}", "n": 1,
                          "selected": (teacher.accuracy, 0.0) if teacher.accuracy is not None else None,
                          "last": None, "val": None, "ece": None})
        for label in study["methods"]:
            runs = [r for r in rows if r["pair"] == name and r["method"] == label]
            if not runs:
                continue
            table.append({"pair": name, "method": label, "n": len(runs),
                          "selected": mean_std([r["test_top1_selected"] for r in runs]),
                          "last": mean_std([r["test_top1_last"] for r in runs]),
                          "val": mean_std([r["val_top1_selected"] for r in runs]),
                          "ece": mean_std([100 * r["ece_selected"] for r in runs])})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    def cell(value):
        return "-" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"

    lines = ["| pair | method | n | test top-1, selected epoch | test top-1, last epoch | val top-1, selected "
             "| test ECE %, selected |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['pair']} | {row['method']} | {row['n']} | {cell(row['selected'])} | "
                     f"{cell(row['last'])} | {cell(row['val'])} | {cell(row.get('ece'))} |")
    return "\n".join(lines)


def plot(study: dict[str, Any], rows: list[dict[str, Any]], table: list[dict[str, Any]], path: Path) -> Path:
    """Per pair: every run's test top-1 (selected epoch and last epoch) per method, the mean ± std, the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, labels = study["pairs"], list(study["methods"])
    fig, axes = plt.subplots(1, len(pairs), figsize=(1.6 * len(labels) + 2, 4.2), squeeze=False)
    for ax, pair in zip(axes[0], map(pair_name, pairs)):
        for i, label in enumerate(labels):
            for offset, key, color, name in ((-0.15, "test_top1_selected", "C0", "selected epoch"),
                                             (0.15, "test_top1_last", "C1", "last epoch")):
                values = [r[key] for r in rows if r["pair"] == pair and r["method"] == label]
                if not values:
                    continue
                mean, std = mean_std(values)
                ax.scatter([i + offset] * len(values), values, color=color, alpha=0.45, s=14)
                ax.errorbar(i + offset, mean, yerr=std, fmt="_", color=color, capsize=5, markersize=16,
                            label=name if i == 0 else None)
        teacher = next((r for r in table if r["pair"] == pair and r["method"].startswith("teacher")), None)
        if teacher is not None and teacher["selected"] is not None:
            ax.axhline(teacher["selected"][0], color="grey", linestyle="--", linewidth=1,
                       label=f"{teacher['method']} ({teacher['selected'][0]:.1f})")
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(title=pair, ylabel="test top-1 % (mean ± std over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def format_tuning(study: dict[str, Any], tuning: list[dict[str, Any]]) -> str:
    """The tuning stage's budget, and per pair and label its chosen hyperparameters and best validation top-1."""
    spec = study["tune"]
    epochs = tuning_epochs(study)
    lines = [f"Tuning budget: {spec['samples']} trials x {epochs} epoch(s) per method ({spec['scheduler']}), "
             f"on the validation split (seed {study['seeds'][0]}); each method's seeds ran with its best trial "
             "(validation top-1 at its selected epoch). Test was not read to choose.", "",
             "| pair | method | space | trials | best tuning val top-1 | chosen hyperparameters |",
             "|---|---|---|---:|---:|---|"]
    for w in tuning:
        chosen = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["params"].items())
        lines.append(f"| {pair_name(w['pair'])} | {w['method']} | {Path(spec['spaces'][w['method']]['file']).stem} | "
                     f"{w['trials']} | {w['val_top1']:.2f} | {chosen} |")
    return "\n".join(lines)


def summarize(study, results, teachers, name, parent_run_id, uri, storage_path, tuning=None) -> dict[str, Any]:
    import csv

    import mlflow

    rows, errors = run_rows(results)
    if not rows:
        raise RuntimeError(f"study {name}: no run finished; first error: {errors[0] if errors else 'none'}")
    table = aggregate(study, rows, teachers)
    out_dir = trials.results_dir(storage_path, name)
    text = format_table(table)
    if tuning:
        text += "\n\n" + format_tuning(study, tuning)
    (out_dir / "study_table.md").write_text(f"# {name}\n\n{study['description']}\n\n{text}\n")
    with open(out_dir / "study_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["pair"], r["method"], r["seed"])))
    (out_dir / "study_summary.json").write_text(json.dumps({"study": name, "spec": study["file"], "table": table,
                                                            "runs": rows, "errors": errors, "tuning": tuning},
                                                           indent=1))
    figure = plot(study, rows, table, out_dir / "study_plot.png")
    files = [out_dir / f for f in ("study_table.md", "study_runs.csv", "study_summary.json", "study_plot.png")]
    for file in files:
        mlflow.log_artifact(str(file))
    stored_dir = trials.publish(out_dir, storage_path, name, files)[0].rsplit("/", 1)[0]
    metrics = {}
    for row in table:
        if row["method"].startswith("teacher") or row["selected"] is None:
            continue
        key = f"{row['pair']}/{row['method']}"
        metrics.update({f"{key}/test_top1_selected_mean": row["selected"][0],
                        f"{key}/test_top1_selected_std": row["selected"][1],
                        f"{key}/test_top1_last_mean": row["last"][0], f"{key}/test_top1_last_std": row["last"][1]})
    tracking.log_metrics(uri, parent_run_id, {**metrics, "runs_finished": len(rows), "runs_failed": len(errors)}, 0)
    return {"name": name, "parent_run_id": parent_run_id, "rows": rows, "errors": errors, "table": table,
            "text": text, "dir": stored_dir, "plot": str(figure), "tuning": tuning}


def run_cli(args: argparse.Namespace) -> int:
    options = [f"tune.resource_timeout_s={args.resource_timeout}"] if args.resource_timeout else []
    study = load_study(args.spec, [*options, *args.overrides])
    summary = run_study(study, args.name, args.resume, args.max_concurrent)
    print(f"\nstudy {summary['name']}: {len(summary['rows'])} runs finished, {len(summary['errors'])} failed")
    for error in summary["errors"]:
        print(f"  failed: {error}")
    print(summary["text"])
    print(f"\nselected epoch = best validation top-1; test is only reported. Files: {summary['dir']}")
    print(f"MLflow parent run: {summary['parent_run_id']}  ({tracking.ui_hint(tracking.tracking_uri())})")
    return 0
