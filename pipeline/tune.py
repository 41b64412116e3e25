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
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline import config as config_lib, run as run_lib, search_space, stopping, teacher_store, tracking
# study.py reads the storage helpers here
from pipeline.storage import filesystem, is_uri, read_bytes, read_text, write_bytes, write_text  # noqa: F401
from pipeline.sweep_progress import Progress, check_timed_out, resource_stopper

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
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials running at once (default: tune.max_concurrent, else every trial; the autoscaler "
                             "adds nodes for those waiting)")
    parser.add_argument("--resource-timeout", type=float, default=None, metavar="SECONDS",
                        help="end the sweep when trials wait this long for resources and none progresses "
                             "(default: tune.resource_timeout_s, 1800)")


def trial_resources(config: dict[str, Any]) -> dict[str, float]:
    """What one trial's TorchTrainer reserves."""
    train = config["train"]
    need = {"CPU": float(train["workers"] * train["cpus_per_worker"])}
    if train["use_gpu"]:
        need["GPU"] = float(train["workers"] * train["gpus_per_worker"])
    return need


def concurrency(config: dict[str, Any], samples: int, cap: int | None = None,
                cluster: dict[str, float] | None = None) -> int:
    """Trials at once: ``cap`` (``--max-concurrent``), else ``tune.max_concurrent``, else every trial.

    Never the nodes up at launch: an autoscaling cluster starts small (no GPU worker at all) and grows
    when trials ask. ``cluster`` is the most the cluster can ever hold, where that is known (see
    :func:`fixed_cluster`); it bounds the concurrency, counting the sliver of CPU (``TRIAL_CPU``) each
    trial's own driver holds beside its workers, so on 2 CPUs the sweep cannot deadlock.
    """
    limit = min(samples, cap or config["tune"]["max_concurrent"] or samples)
    if cluster is None:
        return max(1, limit)
    need = trial_resources(config)
    fits = min(math.floor(cluster.get(k, 0.0) / (v + (TRIAL_CPU if k == "CPU" else 0.0)) + 1e-9)
               for k, v in need.items())
    if fits < 1:
        raise config_lib.ConfigError(f"one trial needs {need} but this Ray instance (started by this command, so it "
                                     f"cannot grow) has {cluster}: lower train.workers, train.cpus_per_worker or "
                                     "train.gpus_per_worker, or run on a cluster (RAY_ADDRESS)")
    return max(1, min(fits, limit))


def fixed_cluster() -> dict[str, float] | None:
    """The resources of a Ray instance this process started itself (no autoscaler: it never grows);
    None for a cluster joined through its address, whose maximum size is not known here."""
    import ray
    from ray._private import worker

    return ray.cluster_resources() if getattr(worker._global_node, "head", False) else None


DEFAULT_VAL_FRACTION = 0.1
TRIAL_CPU = 0.05  # what a trial's own driver process reserves beside its TorchTrainer


def with_validation_split(config: dict[str, Any]) -> dict[str, Any]:
    """Trials are compared on validation accuracy, never on test: carve one when the recipe has none,
    and measure it every epoch (ASHA and the progress table read it from every report)."""
    if config["data"]["eval_every"] != 1:
        log.info("trials evaluate every epoch (data.eval_every=%d ignored): a sweep compares them at each",
                 config["data"]["eval_every"])
        config = config_lib.merge(config, {"data": {"eval_every": 1}})
    if config["data"]["val_fraction"] > 0:
        return config
    log.info("the recipe has no validation split (data.val_fraction=0): trials hold out %d%% of train, "
             "class-balanced (data.val_seed=%d), and are compared on it", 100 * DEFAULT_VAL_FRACTION,
             config["data"]["val_seed"])
    return config_lib.merge(config, {"data": {"val_fraction": DEFAULT_VAL_FRACTION}})


def trial(params: dict[str, Any], *, base: dict[str, Any], teacher: run_lib.Teacher | None,
          parent_run_id: str, sweep_dir: str) -> None:
    """One trial: the base config with the sampled parameters, trained by its own TorchTrainer."""
    config = search_space.apply(base, params)
    train_trial(config, teacher, parent_run_id, sweep_dir, {"sweep_parent": parent_run_id})


def train_trial(config: dict[str, Any], teacher: run_lib.Teacher | None, parent_run_id: str, sweep_dir: str,
                tags: dict[str, str]) -> None:
    """Train one trial of a sweep or study under a name that survives a restart.

    The run is named for what it is and its Tune trial id, which Tune keeps across ``--resume`` and
    across a retry (``tune.max_failures``), and lives in the sweep's folder: a restarted trial's
    TorchTrainer finds its own (storage_path, name) and goes on from its last checkpoint, and its
    MLflow run is reopened rather than a second one started.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    config["train"]["run_name"] = f"{config_lib.run_label(config, teacher.spec['name'] if teacher else None)}-{trial_id}"
    config["train"]["storage_path"] = sweep_dir
    uri = tracking.tracking_uri(config)
    _, earlier = trial_run(uri, config["mlflow"]["experiment"], parent_run_id, trial_id)
    if earlier is not None:
        log.info("trial %s: continuing MLflow run %s and its last checkpoint", trial_id, earlier.info.run_id)
    run_lib.train(config, teacher=teacher, parent_run_id=parent_run_id, extra_tags={"trial_id": trial_id, **tags},
                  callbacks=[epochs_done_callback()], resume_run_id=earlier.info.run_id if earlier else None,
                  verify_data=False)  # the sweep's driver verified it


def epochs_done_callback():
    """Forwards each epoch's report to Tune with ``epochs_done``: ASHA's clock. Tune's own
    ``training_iteration`` starts again at 1 when a trial restarts from its checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsDone(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = {**metrics[0], "epochs_done": int(metrics[0]["epoch"]) + 1}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochsDone()


def sweep(base: dict[str, Any], space: dict[str, Any], samples: int, scheduler: str, name: str | None = None,
          resume: bool = False, max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep. Returns a summary with the best trial and the MLflow parent run."""
    from ray import tune

    base = with_validation_split(config_lib.with_method(base, {"name": space["method"]}))
    if space["method"] != "ce" and not base["teacher"]["source"]:
        raise config_lib.ConfigError(f"the space trains {space['method']!r}, which needs teacher.source")
    info = run_lib.dataset_info(base)
    run_lib.ensure_ray()
    storage = base["train"]["storage_path"]  # a local path (made absolute by config.load) or a URI
    stem = Path(space["file"]).stem
    name = name or (latest_sweep(storage, f"tune-{stem}-") if resume else None) or new_sweep_name(f"tune-{stem}")
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
        tags.update({"teacher_uri": teacher.uri,
                     "teacher_test_top1": f"{teacher.accuracy:.{teacher_store.ACCURACY_DIGITS}f}"})
    with tracking.tracked_run(uri, base["mlflow"]["experiment"], name, params if not state else {}, tags,
                              resume_run_id=state.get("parent_run_id")) as parent_run_id:
        write_text(f"{sweep_dir}/{SWEEP_FILE}", json.dumps({"parent_run_id": parent_run_id}))
        trainable = functools.partial(trial, base=base, teacher=teacher, parent_run_id=parent_run_id,
                                      sweep_dir=sweep_dir)
        trainable = tune.with_resources(trainable, {"CPU": TRIAL_CPU})
        trials = search_space.trial_count(space["parameters"], samples)
        concurrent = concurrency(base, trials, max_concurrent, fixed_cluster())
        progress = Progress(metric, epochs, trial_resources(base), base["tune"]["resource_timeout_s"])
        param_space = search_space.to_tune(space["parameters"])
        try:
            if resume:
                tuner = restore(sweep_dir, trainable, param_space, base, progress)
            else:
                sched = make_scheduler(scheduler, base, (uri, base["mlflow"]["experiment"], parent_run_id),
                                       state_file=f"{sweep_dir}/{ASHA_STATE}")
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space,
                    tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=samples, scheduler=sched,
                                                max_concurrent_trials=concurrent),
                    run_config=run_config(base, name, storage, progress),
                )
            log.info("sweep %s: %d trial(s), %s, up to %d at once", name, trials, scheduler, concurrent)
            with stopping.signals.graceful(stopping.tune_stopper):
                results = tuner.fit()
            stopping.signals.check(continue_with=stopping.continue_command(resume_name=name))
            check_timed_out(progress, f"sweep {name}", "tune.resource_timeout_s=SECONDS or "
                            "--resource-timeout SECONDS", stopping.continue_command(resume_name=name))
        finally:
            close_trial_runs(uri, base["mlflow"]["experiment"], parent_run_id, epochs)
        return summarize(results, base, space, uri, parent_run_id, name)


def new_sweep_name(prefix: str) -> str:
    """``prefix``, the UTC time (sortable: ``--resume`` finds the latest by name, also on S3, whose
    prefixes have no modification time) and a short random id."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"


def run_config(base: dict[str, Any], name: str, storage: str, progress):
    """Where the sweep lives, how a failed trial is retried, and when waiting for resources ends it."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[progress],
                          stop=resource_stopper(progress),
                          failure_config=tune.FailureConfig(max_failures=base["tune"]["max_failures"]))


def restore(sweep_dir: str, trainable, param_space: dict[str, Any], base: dict[str, Any], progress):
    """The interrupted sweep at ``sweep_dir``, its errored and unfinished trials to run again, with
    this command's callbacks, stopper and retries (``Tuner.restore`` takes no RunConfig and would run
    the pickled ones, clocks included). ``param_space`` is the sweep's space, given again: Tune saves
    functions in it (a study's ``tune.sample_from``) as placeholders that only it fills, and without
    it every trial not yet started would run with "__fn_ph" values."""
    from ray import tune

    tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True, param_space=param_space)
    fresh = run_config(base, "", sweep_dir, progress)
    restored = tuner._local_tuner.get_run_config()
    restored.callbacks, restored.stop, restored.failure_config = fresh.callbacks, fresh.stop, fresh.failure_config
    return tuner


ASHA_STATE = "asha_state.pkl"  # in the sweep's folder: ASHA's rungs, for --resume


def make_scheduler(scheduler: str, base: dict[str, Any], mlflow_parent: tuple[str, str, str], **asha: Any):
    """FIFO, or ASHA on ``base``'s epochs; ``asha`` adds ASHA's own arguments (a study's per-label
    schedulers take their ``metric`` and ``mode`` there, since no one TuneConfig metric fits all)."""
    from ray.tune.schedulers import FIFOScheduler

    if scheduler != "asha":
        return FIFOScheduler()
    epochs = base["optim"]["epochs"]
    # stop_last_trials=False: a trial reaching max_t must finish its own run (final metrics, model).
    return make_asha(mlflow_parent, time_attr="epochs_done", max_t=epochs, grace_period=grace_period(base),
                     reduction_factor=base["tune"]["reduction_factor"], stop_last_trials=False, **asha)


def grace_period(config: dict[str, Any]) -> int:
    """ASHA's first rung, in epochs: ``tune.grace_period``, else the first epoch after the first
    learning-rate drop (multistep), or half way through the cosine decay: accuracy at the high starting
    rate says little about where a trial ends after the drop."""
    optim = config["optim"]
    if config["tune"]["grace_period"]:
        return config["tune"]["grace_period"]
    epochs, warmup = optim["epochs"], optim["warmup_epochs"]
    if optim["schedule"] == "cosine":
        return max(1, warmup + (epochs - warmup) // 2)
    if optim["milestones"]:
        return min(epochs, optim["milestones"][0] + 1)
    return max(1, epochs // 4)  # a constant learning rate: nothing to wait for


STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{4}$")  # new_sweep_name's UTC time


def latest_sweep(storage: str, prefix: str) -> str | None:
    """The newest sweep folder named ``prefix...``: by the UTC time in its name, since S3 prefixes have no
    modification time; a folder named before names carried the time comes earlier, by its mtime."""
    import pyarrow.fs

    fs, inner = filesystem(storage)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    candidates = [i for i in infos if i.base_name.startswith(prefix) and i.type == pyarrow.fs.FileType.Directory]
    if not candidates:
        return None
    stamp = STAMP.search
    return max(candidates, key=lambda i: ((m := stamp(i.base_name)) and m.group(1) or "", i.mtime_ns or 0)).base_name


def trial_run(uri: str, experiment: str, parent_run_id: str, trial_id: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                              f"tags.trial_id = '{trial_id}'")
    return c, (runs[0] if runs else None)


def make_asha(mlflow_parent: tuple[str, str, str], state_file: str | None = None, **kwargs):
    """ASHA that tags the MLflow run of every trial it stops, so the run can be ended as stopped early
    rather than failed (stopping removes the trial's placement group, and its TorchTrainer dies).

    It also keeps its rungs in ``state_file`` (beside the sweep's Tune state) after every result, and
    a restored sweep's ASHA reads them back: Tune restores a sweep with the scheduler as it was created,
    empty, so the trials after a ``--resume`` would be compared with none of those before it (the
    first trial at each rung always goes on) and a resumed sweep would promote more than it should."""
    from ray.tune.schedulers import ASHAScheduler

    class MarkingASHA(ASHAScheduler):
        def __init__(self, **asha):
            super().__init__(**asha)
            self.state_file, self.state_read = state_file, False

        def read_state_once(self) -> None:
            if self.state_read or not self.state_file:
                return
            self.state_read = True
            saved = read_bytes(self.state_file)
            if saved is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "asha.pkl").write_bytes(saved)
                    self.restore(str(Path(tmp) / "asha.pkl"))  # ASHA's own save/restore: its whole state
                log.info("ASHA's rungs read back from %s", self.state_file)

        def write_state(self) -> None:
            if self.state_file:
                with tempfile.TemporaryDirectory() as tmp:
                    self.save(str(Path(tmp) / "asha.pkl"))
                    write_bytes(self.state_file, (Path(tmp) / "asha.pkl").read_bytes())

        def on_trial_add(self, tune_controller, trial):
            self.read_state_once()
            if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
                super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            self.read_state_once()
            action = super().on_trial_result(tune_controller, trial, result)
            self.write_state()
            if action == self.STOP:
                c, run = trial_run(*mlflow_parent, trial.trial_id)
                if run is not None:
                    c.set_tag(run.info.run_id, "stopped_by_scheduler",
                              f"asha, after {result.get('epochs_done')} epochs")
            return action

        def on_trial_complete(self, tune_controller, trial, result):
            self.read_state_once()
            super().on_trial_complete(tune_controller, trial, result)
            self.write_state()

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
    table_at, recipe_at, plot_at = publish(out_dir, storage, name, [table, recipe, plot])
    best_value, best_test = float(best.metrics[SELECTED_VAL]), float(best.metrics[SELECTED_TEST])
    tracking.log_metrics(uri, parent_run_id, {"best/val_top1": best_value, "best/test_top1_selected": best_test,
                                              "trials": float(len(frame))}, step=0)
    tracking.set_tags(uri, parent_run_id, {"best_trial": best.metrics.get("trial_id", ""),
                                           **{f"best.{k}": v for k, v in best_params.items()}})
    return {"name": name, "parent_run_id": parent_run_id, "trials": len(frame), "best_params": best_params,
            "best_value": best_value, "best_test": best_test, "best_recipe": str(recipe), "table": table_at,
            "plot": plot_at, "stored_recipe": recipe_at}


def results_dir(storage: str, name: str) -> Path:
    """Where a sweep or study writes its tables and plots: beside its Tune state when storage is local;
    for a URI, a local folder that :func:`publish` copies there."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"{name}-")) if is_uri(storage) else Path(storage) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def publish(out_dir: Path, storage: str, name: str, files: list[Path]) -> list[str]:
    """The sweep's result files in its folder on ``storage`` (copied there when it is a URI, such as
    s3://); returns where each one is."""
    if not is_uri(storage):
        return [str(f) for f in files]
    import pyarrow.fs

    fs, inner = filesystem(f"{storage.rstrip('/')}/{name}")
    local = pyarrow.fs.LocalFileSystem()
    for f in files:
        pyarrow.fs.copy_files(str(f), f"{inner}/{f.name}", source_filesystem=local, destination_filesystem=fs)
    return [f"{storage.rstrip('/')}/{name}/{f.name}" for f in files]


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
    options = [f"tune.resource_timeout_s={args.resource_timeout}"] if args.resource_timeout else []
    base = config_lib.load(args.recipe, [f"method.name={space['method']}", *options, *args.overrides])
    summary = sweep(base, space, args.samples, args.scheduler, args.name, args.resume, args.max_concurrent)
    print(f"sweep {summary['name']}: {summary['trials']} trials; best validation top-1 {summary['best_value']:.2f} "
          f"(test top-1 at its selected epoch {summary['best_test']:.2f}) with {summary['best_params']}")
    print(f"MLflow parent run: {summary['parent_run_id']}")
    print(f"best recipe: {summary['best_recipe']}  (run it: stkd distill --recipe {summary['best_recipe']})"
          + (f"; stored at {summary['stored_recipe']}" if summary["stored_recipe"] != summary["best_recipe"] else ""))
    print(f"trials table: {summary['table']}; plot: {summary['plot']}")
    return 0
