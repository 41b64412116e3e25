"""``stkd tune``: Ray Tune sweeps, one ``TorchTrainer`` per trial, nested MLflow runs.

The driver loads the teacher once and ``ray.put``s it once; every trial (and every worker of every
trial) receives that one ObjectRef through ``functools.partial``, never through
``tune.with_parameters`` (which would dereference it into a copy per trial).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_lib, run as run_lib, search_space, tracking

log = logging.getLogger(__name__)

SWEEP_FILE = "stkd_sweep.json"
SELECTED_VAL, SELECTED_TEST = "selected/val_top1", "selected/test_top1"  # reported by every epoch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="search space YAML path or shipped name (tune_spaces/)")
    parser.add_argument("--samples", type=int, default=8, help="trials to sample (each grid point this many times)")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    parser.add_argument("--name", help="sweep name (default: a new unique one); with --resume, the sweep to resume")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted sweep (the latest one of this "
                                                               "space unless --name says which)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")


def trial_resources(config: dict[str, Any]) -> dict[str, float]:
    """What one trial's TorchTrainer reserves."""
    train = config["train"]
    need = {"CPU": train["workers"] * train["cpus_per_worker"]}
    if train["use_gpu"]:
        need["GPU"] = train["workers"] * train["gpus_per_worker"]
    return need


def concurrency(config: dict[str, Any], cluster: dict[str, float], samples: int, cap: int | None) -> int:
    """Trials that fit in the cluster at once (several small students share a GPU with fractional GPUs).

    Each running trial's own driver process holds a sliver of CPU (``TRIAL_CPU``) beside its workers,
    so the trainers' workers never wait on resources held by trial drivers: on 2 CPUs the sweep cannot
    deadlock.
    """
    need = trial_resources(config)
    fits = min(math.floor(cluster.get(k, 0.0) / (v + (TRIAL_CPU if k == "CPU" else 0.0)) + 1e-9)
               for k, v in need.items())
    if fits < 1:
        raise config_lib.ConfigError(f"one trial needs {need} but the cluster has {cluster}: lower train.workers, "
                                     "train.cpus_per_worker or train.gpus_per_worker")
    return max(1, min(fits, samples, cap or samples))


DEFAULT_VAL_FRACTION = 0.1
TRIAL_CPU = 0.05  # what a trial's own driver process reserves beside its TorchTrainer


def with_validation_split(config: dict[str, Any]) -> dict[str, Any]:
    """Trials are compared on validation accuracy, never on test: carve one when the recipe has none."""
    if config["data"]["val_fraction"] > 0:
        return config
    log.info("the recipe has no validation split (data.val_fraction=0): trials hold out %d%% of train, "
             "class-balanced (data.val_seed=%d), and are compared on it", 100 * DEFAULT_VAL_FRACTION,
             config["data"]["val_seed"])
    return config_lib.merge(config, {"data": {"val_fraction": DEFAULT_VAL_FRACTION}})


def trial(params: dict[str, Any], *, base: dict[str, Any], teacher: run_lib.Teacher | None,
          parent_run_id: str) -> None:
    """One trial: the base config with the sampled parameters, trained by its own TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = search_space.apply(base, params)
    trial_id = tune.get_context().get_trial_id()
    config["train"]["run_name"] = f"{config['name']}-{trial_id}-{uuid.uuid4().hex[:6]}"
    run_lib.train(config, teacher=teacher, parent_run_id=parent_run_id,
                  extra_tags={"trial_id": trial_id, "sweep_parent": parent_run_id},
                  callbacks=[TuneReportCallback()], verify_data=False)  # the sweep's driver verified it


class Progress:
    """A Tune callback logging trials running, finished, stopped early, and the best so far."""

    def __new__(cls, metric: str, epochs: int):
        from ray import tune

        class _Progress(tune.Callback):
            def __init__(self):
                self.best = None
                self.last_log = 0.0

            def on_trial_result(self, iteration, trials, trial, result, **info):
                value = result.get(metric)
                if value is not None and (self.best is None or value > self.best[0]):
                    self.best = (value, trial.trial_id)
                if time.monotonic() - self.last_log > 10:
                    self.log(trials)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.log(trials)

            def log(self, trials):
                self.last_log = time.monotonic()
                done = [t for t in trials if t.status == "TERMINATED"]
                stopped = [t for t in done if (t.last_result or {}).get("training_iteration", 0) < epochs]
                running = sum(t.status == "RUNNING" for t in trials)
                best = f"{self.best[0]:.2f} ({self.best[1]})" if self.best else "-"
                log.info("trials: %d running, %d finished, %d stopped early, %d errored, %d pending; best epoch %s %s",
                         running, len(done) - len(stopped), len(stopped), sum(t.status == "ERROR" for t in trials),
                         sum(t.status == "PENDING" for t in trials), metric, best)

        return _Progress()


def sweep(base: dict[str, Any], space: dict[str, Any], samples: int, scheduler: str, name: str | None = None,
          resume: bool = False, max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep. Returns a summary with the best trial and the MLflow parent run."""
    import ray
    from ray import tune

    base = with_validation_split(config_lib.with_method(base, {"name": space["method"]}))
    if space["method"] != "ce" and not base["teacher"]["source"]:
        raise config_lib.ConfigError(f"the space trains {space['method']!r}, which needs teacher.source")
    info = run_lib.dataset_info(base)
    run_lib.ensure_ray()
    storage = base["train"]["storage_path"]  # a local path (made absolute by config.load) or a URI
    stem = Path(space["file"]).stem
    name = name or (latest_sweep(storage, f"tune-{stem}-") if resume else None) or f"tune-{stem}-{uuid.uuid4().hex[:8]}"
    sweep_dir = f"{storage.rstrip('/')}/{name}"
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise config_lib.ConfigError(f"no sweep to resume at {sweep_dir}")
    teacher = run_lib.load_teacher(base, info) if base["teacher"]["source"] else None
    uri = tracking.tracking_uri(base)
    metric, epochs = space["metric"], base["optim"]["epochs"]
    state = json.loads(read_text(f"{sweep_dir}/{SWEEP_FILE}") or "{}") if resume else {}

    params = {"space": space["file"], "samples": samples, "scheduler": scheduler, "metric": metric,
              **{f"space.{k}": json.dumps(v) for k, v in space["parameters"].items()},
              **config_lib.flatten(base)}
    tags = {"sweep": name, "method": space["method"], "student": base["model"]["student"]}
    if teacher:
        tags.update({"teacher_uri": teacher.uri, "teacher_test_top1": f"{teacher.accuracy}"})
    with tracking.tracked_run(uri, base["mlflow"]["experiment"], name, params if not state else {}, tags,
                              resume_run_id=state.get("parent_run_id")) as parent_run_id:
        write_text(f"{sweep_dir}/{SWEEP_FILE}", json.dumps({"parent_run_id": parent_run_id}))
        trainable = functools.partial(trial, base=base, teacher=teacher, parent_run_id=parent_run_id)
        trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
        try:
            results = run_tuner(trainable, space, samples, scheduler, name, storage, resume, sweep_dir,
                                concurrency(base, ray.cluster_resources(), samples, max_concurrent), metric, epochs,
                                (uri, base["mlflow"]["experiment"], parent_run_id))
        finally:
            close_trial_runs(uri, base["mlflow"]["experiment"], parent_run_id, epochs)
        return summarize(results, base, space, uri, parent_run_id, name)


def run_tuner(trainable, space, samples, scheduler, name, storage, resume, sweep_dir, max_concurrent, metric,
              epochs, mlflow_parent):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    if resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        # stop_last_trials=False: a trial reaching max_t must finish its own run (final metrics, model).
        sched = (make_asha(mlflow_parent, time_attr="training_iteration", max_t=epochs,
                           grace_period=max(1, epochs // 4), reduction_factor=2, stop_last_trials=False)
                 if scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=search_space.to_tune(space["parameters"]),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=sched, num_samples=samples,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[Progress(metric, epochs)],
                                      verbose=0),
        )
    log.info("sweep %s: %d sample(s), %s, up to %d trial(s) at once", name, samples, scheduler, max_concurrent)
    return tuner.fit()


def filesystem(path: str):
    """A pyarrow filesystem and path for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def read_text(path: str) -> str | None:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def write_text(path: str, text: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def latest_sweep(storage: str, prefix: str) -> str | None:
    import pyarrow.fs

    fs, inner = filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    candidates = sorted((i for i in infos if i.base_name.startswith(prefix)), key=lambda i: i.mtime or 0)
    return candidates[-1].base_name if candidates else None


def trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                              f"tags.trial_id = '{trial_id}'")
    return c, (runs[0] if runs else None)


def make_asha(mlflow_parent: tuple[str, str, str], **kwargs):
    """ASHA that tags the MLflow run of every trial it stops, so the run can be ended as stopped early
    rather than failed (stopping removes the trial's placement group, and its TorchTrainer dies)."""
    from ray.tune.schedulers import ASHAScheduler

    class MarkingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == self.STOP:
                c, run = trial_run(*mlflow_parent, trial.trial_id)
                if run is not None:
                    c.set_tag(run.info.run_id, "stopped_by_scheduler",
                              f"asha, after {result.get('training_iteration')} epochs")
            return action

    return MarkingASHA(**kwargs)


def close_trial_runs(uri: str, experiment: str, parent_run_id: str, epochs: int) -> None:
    """End trial runs that could not end themselves: a trial the scheduler stopped ends KILLED with
    the reason (whether its process was killed, leaving the run RUNNING, or its trainer died first,
    making it FAILED); any other run still RUNNING ends KILLED as interrupted."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for child in children:
        stopped = child.data.tags.get("stopped_by_scheduler")
        if child.info.status == "FINISHED" or (child.info.status != "RUNNING" and not stopped):
            continue
        done = len(c.get_metric_history(child.info.run_id, "test/top1"))
        reason = (f"stopped early by the scheduler ({stopped}) after {done} of {epochs} epochs" if stopped
                  else f"sweep ended while the trial was running, after {done} of {epochs} epochs")
        c.set_tag(child.info.run_id, "end_reason", reason)
        c.set_terminated(child.info.run_id, "KILLED")


def summarize(results, base, space, uri, parent_run_id, name) -> dict[str, Any]:
    """Log the trial table, the accuracy-vs-hyperparameter plot and the best recipe on the parent run."""
    import mlflow

    frame = results.get_dataframe()
    metric = space["metric"]
    if metric not in frame or frame[metric].isna().all():
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
        raise RuntimeError(f"sweep {name}: no trial reported {metric}; {len(errors)} of {len(results)} trials "
                           f"failed" + (f", first error: {errors[0]}" if errors else ""))
    # Each trial's score is its selected epoch's validation accuracy; its test accuracy is only reported.
    best = results.get_best_result(metric=SELECTED_VAL, mode="max", scope="last")
    best_params = {k: best.config[k] for k in space["parameters"]}
    best_config = search_space.apply(base, best_params)
    best_config["name"] = f"{base['name']}-best-{name}"
    best_config["train"]["run_name"] = None
    best_config["data"]["val_fraction"] = 0.0  # the winner retrains on the whole train split
    storage = base["train"]["storage_path"]
    out_dir = results_dir(storage, name)
    table = out_dir / "trials.csv"
    frame.to_csv(table, index=False)
    recipe = out_dir / "best_recipe.yaml"
    recipe.write_text(f"# Best trial of sweep {name}: validation top-1 {best.metrics.get(SELECTED_VAL):.2f} at its "
                      f"selected epoch (test top-1 there {best.metrics.get(SELECTED_TEST):.2f}, reported only).\n"
                      "# Retrains on the whole train split (data.val_fraction: 0).\n"
                      + yaml.safe_dump(best_config, sort_keys=False))
    plot = plot_trials(frame, list(space["parameters"]), SELECTED_VAL, out_dir / "accuracy_vs_hyperparameters.png")
    for path in (table, recipe, plot):
        mlflow.log_artifact(str(path))
    best_value, best_test = float(best.metrics[SELECTED_VAL]), float(best.metrics[SELECTED_TEST])
    tracking.log_metrics(uri, parent_run_id, {"best/val_top1": best_value, "best/test_top1_selected": best_test,
                                              "trials": float(len(frame))}, step=0)
    tracking.set_tags(uri, parent_run_id, {"best_trial": best.metrics.get("trial_id", ""),
                                           **{f"best.{k}": v for k, v in best_params.items()}})
    return {"name": name, "parent_run_id": parent_run_id, "trials": len(frame), "best_params": best_params,
            "best_value": best_value, "best_test": best_test, "best_recipe": str(recipe), "table": str(table),
            "plot": str(plot)}


def results_dir(storage: str, name: str) -> Path:
    """Where a sweep or study writes its tables and plots: beside its Tune state when storage is local;
    for a URI, a temporary folder whose files MLflow keeps."""
    out_dir = Path(storage) / name if "://" not in storage else Path(tempfile.mkdtemp(prefix=f"{name}-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def plot_trials(frame, keys: list[str], metric: str, path: Path) -> Path:
    """Final accuracy against each hyperparameter, one panel per hyperparameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        column = f"config/{key}"
        if column in frame and metric in frame:
            values = frame[column]
            if values.dtype == object:
                labels = sorted(values.astype(str).unique())
                ax.scatter([labels.index(str(v)) for v in values], frame[metric])
                ax.set_xticks(range(len(labels)), labels, rotation=20)
            else:
                ax.scatter(values, frame[metric])
        ax.set(xlabel=key, ylabel=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_cli(args: argparse.Namespace) -> int:
    space = search_space.load_space(args.space)
    # The space's method replaces the recipe's: hyperparameters follow the method (config.load).
    base = config_lib.load(args.recipe, [f"method.name={space['method']}", *args.overrides])
    summary = sweep(base, space, args.samples, args.scheduler, args.name, args.resume, args.max_concurrent)
    print(f"sweep {summary['name']}: {summary['trials']} trials; best validation top-1 {summary['best_value']:.2f} "
          f"(test top-1 at its selected epoch {summary['best_test']:.2f}) with {summary['best_params']}")
    print(f"MLflow parent run: {summary['parent_run_id']}")
    print(f"best recipe: {summary['best_recipe']}  (run it: stkd distill --recipe {summary['best_recipe']})")
    print(f"trials table: {summary['table']}; plot: {summary['plot']}")
    return 0
