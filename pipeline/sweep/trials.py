"""What a sweep and a study share: trials that survive a restart, their resources, the schedulers,
the sweep folder and its MLflow parent."""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import compat, config as config_lib, stopping, tracking
from pipeline.storage import filesystem, is_uri, read_bytes, write_bytes
from pipeline.sweep.progress import ResourceStopper, check_timed_out
from pipeline.train import run as run_lib

log = logging.getLogger(__name__)

SWEEP_FILE = "stkd_sweep.json"
SELECTED_VAL, SELECTED_TEST = "selected/val_top1", "selected/test_top1"  # reported by every epoch


def trial_resources(config: dict[str, Any]) -> dict[str, float]:
    """What one trial's TorchTrainer reserves (an elastic trial, ``train.workers: [min, max]``, at its largest:
    trials at once are counted so that each can have all its workers)."""
    train = config["train"]
    workers = config_lib.max_workers(train["workers"])
    need = {"CPU": float(workers * train["cpus_per_worker"])}
    if train["use_gpu"]:
        need["GPU"] = float(workers * train["gpus_per_worker"])
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

    return ray.cluster_resources() if compat.started_ray_here() else None


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


def new_sweep_name(prefix: str) -> str:
    """``prefix``, the UTC time (sortable: ``--resume`` finds the latest by name, also on S3, whose
    prefixes have no modification time) and a short random id."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:4]}"


def run_config(base: dict[str, Any], name: str, storage: str, progress):
    """Where the sweep lives, how a failed trial is retried, and when waiting for resources ends it."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[progress],
                          stop=ResourceStopper(progress),
                          failure_config=tune.FailureConfig(max_failures=base["tune"]["max_failures"]))


def restore(sweep_dir: str, trainable, param_space: dict[str, Any], base: dict[str, Any], progress):
    """The interrupted sweep at ``sweep_dir``, its errored and unfinished trials to run again, with
    this command's callbacks, stopper and retries (``Tuner.restore`` takes no RunConfig and would run
    the pickled ones, clocks included). ``param_space`` is the sweep's space, given again: Tune saves
    what is not a plain value in it (a grid of lists, a function) as placeholders that only it fills.
    A function (``tune.sample_from``) it would draw again for every restored trial, so no sweep here uses
    one (see ``study.draw_samples``)."""
    from ray import tune

    tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True, param_space=param_space)
    fresh = run_config(base, "", sweep_dir, progress)
    restored = compat.restored_run_config(tuner)
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
            if not compat.asha_has_trial(self, trial.trial_id):  # a restored trial keeps its bracket
                super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            self.read_state_once()
            action = super().on_trial_result(tune_controller, trial, result)
            self.write_state()
            if action == self.STOP:
                c, run = trial_run(*mlflow_parent, trial.trial_id)
                if run is not None:
                    c.set_tag(run.info.run_id, tracking.SCHEDULER_STOP_TAG,
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
        stopped = child.data.tags.get(tracking.SCHEDULER_STOP_TAG)
        if child.info.status == "FINISHED" or (child.info.status != "RUNNING" and not stopped):
            continue
        done = len(c.get_metric_history(child.info.run_id, "test/top1"))
        reason = (f"stopped early by the scheduler ({stopped}) after {done} of {epochs} epochs" if stopped
                  else f"sweep ended while the trial was running, after {done} of {epochs} epochs")
        try:
            c.set_tag(child.info.run_id, "end_reason", reason)
        except Exception as e:
            if not tracking.is_unique_key_race(e):
                raise
            # The trial's own process tagged its end at this moment (a stop signal reaches both): its reason
            # stands. It ends its run too; end it here only if it has not.
            if c.get_run(child.info.run_id).info.status != "RUNNING":
                continue
        c.set_terminated(child.info.run_id, "KILLED")


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


def fit(tuner, progress, what: str, timeout_option: str, mlflow_parent: tuple[str, str, str], epochs: int,
        continue_with: str):
    """Tune's fit, stopped gracefully by SIGTERM/SIGINT (Tune's own stop); then a stop, or trials that
    waited too long for resources, raised with the command that continues. Every trial's MLflow run the
    fit leaves open is ended either way (:func:`close_trial_runs`)."""
    try:
        with stopping.signals.graceful(stopping.tune_stopper):
            results = tuner.fit()
        stopping.signals.check(continue_with=continue_with)
        check_timed_out(progress, what, timeout_option, continue_with)
    finally:
        close_trial_runs(*mlflow_parent, epochs)
    return results
