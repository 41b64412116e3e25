"""The driver side of a training job: validate, share the teacher, launch Ray Train, log to MLflow.

``train(config)`` serves ``stkd teacher``, ``stkd distill``, the demo and every Tune trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator


from pipeline import config as config_lib, ray_worker, stopping, storage, tracking
from pipeline.data import val_split
from pipeline.tracking import console as progress, outage, system_metrics
from pipeline.train import checkpoint, teachers
from pipeline.data.dataset import PreparedDataset
from stkd import methods

log = logging.getLogger(__name__)

PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# The controller collects each report when it polls the workers (every 2 s by default), and a worker's
# next report waits for that: an epoch shorter than the interval waited, and so did the end of every run.
POLL_INTERVAL, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.25
USER_ENV = frozenset(os.environ)  # variables the user set, which this module never overrides


def verbose() -> bool:
    """``stkd -v`` (``STKD_VERBOSE=1``): Ray Train's own INFO lines on the console too."""
    return os.environ.get("STKD_VERBOSE") == "1"


@dataclass
class Teacher:
    """A teacher loaded once on the driver and put once into the object store."""

    ref: Any
    uri: str
    spec: dict[str, Any]
    accuracy: float | None = None


class Phases(dict):
    """Seconds spent per named phase, summed over repeats."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = self.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


@dataclass
class Outcome:
    """What a run reports. Test accuracy at the selected epoch (the best by validation accuracy, or
    the last epoch without a validation split) and at the last epoch; never chosen on test."""

    run_id: str
    run_name: str
    selected_epoch: int
    selected_top1: float
    last_top1: float
    val_top1: float | None
    wall_time_s: float
    checkpoint_path: str
    history: list[dict[str, float]] = field(default_factory=list)
    model_uri: str | None = None
    ece_selected: float = float("nan")  # test-split expected calibration error (fraction) at the selected epoch
    phases: dict[str, float] = field(default_factory=dict)  # seconds the driver spent in each part of the run

    def final_metrics(self) -> dict[str, float]:
        out = {"final/test_top1_selected": self.selected_top1, "final/test_top1_last": self.last_top1,
               "final/selected_epoch": self.selected_epoch, "final/wall_time_s": self.wall_time_s,
               "final/ece_selected": self.ece_selected,
               # The literature's figure (best epoch on the test split): optimistic, never used to choose.
               "final/test_top1_best_epoch_optimistic": max(h["test/top1"] for h in self.history
                                                             if "test/top1" in h)}
        if self.val_top1 is not None:
            out["final/val_top1_selected"] = self.val_top1
        return out


def dataset_info(config: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Open the prepared dataset once on the driver and carve the validation split; workers get only
    this summary (with the validation rows' keys). ``verify``: checksum every shard (sha256, reads the
    whole dataset); a sweep's driver verifies once and its trials pass ``False`` (shard sizes only)."""
    dataset = PreparedDataset.open(config["data"]["path"], verify=verify)
    info = {"num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape), "mean": list(dataset.mean),
            "std": list(dataset.std), "train_rows": dataset.rows("train"), "test_rows": dataset.rows("test"),
            "val_rows": 0, "path": str(Path(config["data"]["path"]).resolve()), "val_keys": None,
            "val_positions": None, "name": dataset.name, "digest": tracking.dataset_digest(dataset.manifest)}
    fraction = config["data"]["val_fraction"]
    if fraction > 0:
        images, labels = dataset.load_numpy("train")
        try:
            split = val_split.carve(images, labels, fraction, config["data"]["val_seed"], dataset.classes)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
        info.update(val_keys=split.keys, val_positions=split.positions, val_rows=split.rows,
                    train_rows=dataset.rows("train") - split.rows)
    return info


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS or started on this machine, or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True, logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": ray_worker.SETUP_HOOK})
        stopping.signals.reinstall()  # ray.init sets a SIGTERM handler of its own


def load_teacher(config: dict[str, Any], info: dict[str, Any]) -> Teacher:
    """Load the teacher once, check it fits the dataset, measure its test accuracy, ``ray.put`` it once."""
    ensure_ray()
    return share_teacher(*fetch_teacher(config, info))


def share_teacher(state: dict[str, Any], uri: str, accuracy: float | None) -> Teacher:
    """``ray.put`` a fetched teacher once: the ObjectRef every worker and trial shares."""
    return Teacher(ref=teachers.put(state), uri=uri, spec=state["model"], accuracy=accuracy)


def fetch_teacher(config: dict[str, Any], info: dict[str, Any]) -> tuple[dict[str, Any], str, float | None]:
    """The teacher's checkpoint, checked against the dataset, and its test accuracy; without Ray, so a bad
    ``teacher.source`` is a one-line error before anything starts. Returns ``(state, uri, accuracy)``."""
    store = tracking.tracking_uri(config)  # where a registered teacher is looked up
    state, uri = teachers.fetch(config["teacher"]["source"], store)
    spec = state["model"]
    if spec["num_classes"] != info["num_classes"] or spec["in_channels"] != info["image_shape"][2]:
        raise config_lib.ConfigError(
            f"teacher {uri} was trained for {spec['num_classes']} classes and {spec['in_channels']} channels; "
            f"dataset {info['path']} has {info['num_classes']} classes and {info['image_shape'][2]} channels")
    try:
        methods.method_class(config["method"]["name"]).check_architectures(config["model"]["student"], spec["name"])
    except ValueError as e:
        raise config_lib.ConfigError(f"method.name={config['method']['name']} with teacher {uri}: {e}") from None
    accuracy = None
    recorded = teachers.recorded_accuracy(uri, info["digest"], store) if config["teacher"]["evaluate"] else None
    if recorded is not None:
        # Measured on this very test split (same shard checksums) when it was registered: no second pass.
        accuracy = recorded
        log.info("teacher %s (%s): test top-1 %.2f%% (recorded on its version for this dataset)", uri, spec["name"],
                 accuracy)
    elif config["teacher"]["evaluate"]:
        model = checkpoint.build_model(spec)
        model.load_state_dict(state["student"])
        images, labels = PreparedDataset.open(info["path"], verify=False).load_numpy("test")
        accuracy = teachers.accuracy(model, images, labels, info["mean"], info["std"],
                                          config["data"]["eval_batch_size"])
        log.info("teacher %s (%s): test top-1 %.2f%%", uri, spec["name"], accuracy)
    return state, uri, accuracy


def make_trainer(config: dict[str, Any], loop_context: dict[str, Any], run_name: str, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.feeds import ray_datasets, split_data_config
    from pipeline.train.worker_loop import train_loop_per_worker

    train_cfg = config["train"]
    resources = {"CPU": train_cfg["cpus_per_worker"]}
    if train_cfg["use_gpu"]:
        resources["GPU"] = train_cfg["gpus_per_worker"]
    datasets, data_config = None, None
    if not config["data"]["in_memory"]:
        dataset = PreparedDataset.open(config["data"]["path"], verify=False)
        info = loop_context["dataset_info"]
        val = (info["val_keys"], config["data"]["val_seed"]) if info["val_keys"] is not None else None
        with_indices = methods.method_class(config["method"]["name"]).needs_indices  # CRD's memory bank
        datasets = ray_datasets(dataset, config_lib.max_workers(train_cfg["workers"]), val, with_indices=with_indices,
                                val_positions=info["val_positions"])
        data_config = split_data_config()
    storage = storage_dir(config)
    # Ray Train passes these on to its controller; a value the user set wins.
    if PREEMPTION_WATCHER not in USER_ENV:
        os.environ[PREEMPTION_WATCHER] = "1" if train_cfg["preemption_watcher"] else "0"
    if POLL_INTERVAL not in USER_ENV:
        os.environ[POLL_INTERVAL] = str(POLL_INTERVAL_S)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_context,
        scaling_config=ScalingConfig(num_workers=config_lib.scaling_workers(train_cfg["workers"]),
                                     use_gpu=train_cfg["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=train_cfg["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
        **({"dataset_config": data_config} if data_config else {}),
    )


def train(
    config: dict[str, Any],
    teacher: Teacher | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    verify_data: bool = True,
    resume_run_id: str | None = None,
) -> Outcome:
    """Run one training job end to end and log it as one MLflow run.

    ``config``: a resolved config, validated where it was made (``config.load``, ``config.with_method``,
    ``search_space.apply``); not validated again here.

    ``teacher``: an already shared teacher (a sweep shares one across trials); otherwise the
    config's ``teacher.source`` is loaded here. ``callbacks``: Ray Train callbacks (a Tune trial
    passes the one that forwards each epoch's report to Tune). ``verify_data``: checksum the dataset
    (a trial passes ``False``: its sweep's driver has verified it). ``resume_run_id``: the MLflow run of
    this run's earlier attempt (a restarted Tune trial), continued rather than a second one started.
    """
    from pipeline.tracking.epoch_logger import UNLOGGED_FILE, EpochLogger  # imports ray.train

    phases = Phases()
    called = time.perf_counter()
    if parent_run_id is None and resume_run_id is None and config["train"]["run_name"]:
        resume_run_id = earlier_attempt(tracking.tracking_uri(config), config["mlflow"]["experiment"],
                                        f"{storage_dir(config)}/{config['train']['run_name']}")
    info, teacher = data_teacher_and_ray(config, teacher, verify_data, phases)
    run_name = config_lib.new_run_name(config, teacher.spec["name"] if teacher else None)
    uri = tracking.tracking_uri(config)
    run_dir = f"{storage_dir(config)}/{run_name}"  # Ray Train's folder for this run
    tags = run_tags(config, info, teacher, run_dir if parent_run_id is None else None, extra_tags)
    start = time.perf_counter()
    params = config_lib.flatten(config) if not resume_run_id else {}  # a reopened run has them already
    with tracking.tracked_run(uri, config["mlflow"]["experiment"], run_name, params, tags,
                              parent_run_id, resume_run_id) as run_id:
        log_inputs(uri, run_id, config, info, teacher, resumed=bool(resume_run_id))
        # The run's id and store reach the workers, whose local rank 0 logs its node's hardware use into the run.
        loop_context = {"config": config, "dataset_info": info, "teacher_ref": teacher.ref if teacher else None,
                        "mlflow_run_id": run_id, "tracking_uri": uri, "system_metrics": system_metrics.settings(),
                        "stop_file": f"{run_dir}/{stopping.STOP_FILE}"}
        log.info("run %s: %s %s on %s with %s worker(s)", run_name, config["method"]["name"],
                 config["model"]["student"], info["path"], config_lib.workers_label(config["train"]["workers"]))
        phases.add("mlflow_start", time.perf_counter() - start)
        epoch_logger = EpochLogger(uri, run_id)
        if resume_run_id:  # epochs the earlier attempt logged after its last checkpoint are trained again
            epoch_logger.logged.update(outage.logged_epochs(uri, run_id))
        continue_with = stopping.continue_command(override=f"train.run_name={run_name}")
        with phases.time("fit"):
            result = fit(config, loop_context, run_name, [epoch_logger, *(callbacks or [])], continue_with)
        wall = time.perf_counter() - start
        with result.checkpoint.as_directory() as directory:
            state = checkpoint.load(directory)
            unlogged = outage.read_json(Path(directory) / UNLOGGED_FILE) or {"epochs": []}
        # Where the checkpoint is, as the user names storage: Ray's path has no scheme (s3://) on a remote file system.
        checkpoint_path = f"{run_dir}/{PurePosixPath(result.checkpoint.path).name}"
        if state.get("stopped"):
            stopped_early(uri, run_id, state, unlogged["epochs"], config["optim"]["epochs"], checkpoint_path,
                          continue_with)
        outcome = outcome_of(state, info, run_id, run_name, wall, checkpoint_path)
        log.info("run %s trained: checkpoint %s", run_name, outcome.checkpoint_path)
        record = end_record(uri, run_id, run_name, config, info, outcome, state, unlogged["epochs"])
        with phases.time("finish"):
            outcome.model_uri = outage.finish_logging(record, state, config["mlflow"]["outage_wait_s"],
                                                      checkpoint_path)
        ending = time.perf_counter()
    phases.add("mlflow_end", time.perf_counter() - ending)
    phases.add("total", time.perf_counter() - called)
    outcome.phases = phases
    return outcome


def data_teacher_and_ray(config: dict[str, Any], teacher: Teacher | None, verify_data: bool,
                         phases: Phases) -> tuple[dict[str, Any], Teacher | None]:
    """The dataset checked, the teacher loaded and checked (both before Ray starts, so that bad input is
    an error in seconds), Ray started, and the teacher put into its object store once."""
    with phases.time("dataset"):
        info = dataset_info(config, verify=verify_data)
    fetched = None
    if teacher is None and config["teacher"]["source"]:
        with phases.time("teacher"):
            fetched = fetch_teacher(config, info)
    with phases.time("ray_start"):
        ensure_ray()
    if fetched is not None:
        with phases.time("teacher"):
            teacher = share_teacher(*fetched)
    return info, teacher


def run_tags(config: dict[str, Any], info: dict[str, Any], teacher: Teacher | None, run_key: str | None,
             extra_tags: dict[str, str] | None) -> dict[str, str]:
    """The run's MLflow tags. ``run_key``: what the same command, naming this run, finds it by
    (:func:`earlier_attempt`); None for a sweep's trial, which its sweep finds."""
    tags = {"method": config["method"]["name"], "student": config["model"]["student"], "dataset": info["path"],
            "seed": str(config["train"]["seed"]), "workers": config_lib.workers_label(config["train"]["workers"]),
            "train_rows": str(info["train_rows"]), "val_rows": str(info["val_rows"]), **(extra_tags or {})}
    if run_key is not None:
        tags[RUN_KEY_TAG] = run_key
    if teacher is not None:
        tags.update({"teacher_uri": teacher.uri, "teacher_model": teacher.spec["name"],
                     "teacher_object_id": teacher.ref.hex()})
        if teacher.accuracy is not None:
            tags["teacher_test_top1"] = f"{teacher.accuracy:.{teachers.ACCURACY_DIGITS}f}"
    return tags


def log_inputs(uri: str, run_id: str, config: dict[str, Any], info: dict[str, Any], teacher: Teacher | None,
               resumed: bool) -> None:
    """The dataset as the run's MLflow input and, once, the teacher's accuracy."""
    if teacher is not None and teacher.accuracy is not None and not resumed:
        tracking.log_metrics(uri, run_id, {"teacher/test_top1": teacher.accuracy}, step=0)
    tracking.log_dataset(run_id, info["name"], info["path"], info["digest"], {
        "train_rows": info["train_rows"], "val_rows": info["val_rows"], "test_rows": info["test_rows"],
        "val_fraction": config["data"]["val_fraction"], "val_seed": config["data"]["val_seed"],
        "num_classes": info["num_classes"], "image_shape": info["image_shape"]})


def fit(config: dict[str, Any], loop_context: dict[str, Any], run_name: str, callbacks: list, continue_with: str):
    """Ray Train's fit of the run, the epoch lines on the console, stopped cleanly on a signal
    (:class:`stopping.Stopped` carries the command that continues it)."""
    stop_file = loop_context["stop_file"]
    storage.delete(stop_file)  # an earlier attempt's request is not this one's
    with progress.epoch_lines(run_name, config["optim"]["epochs"]) as shown:
        trainer = make_trainer(config, loop_context, run_name, [callbacks[0], *shown, *callbacks[1:]])
        try:
            return stopping.run_stoppable(trainer.fit, lambda _: stopping.request_stop(stop_file),
                                          config["train"]["stop_grace_s"])
        except stopping.Stopped as e:
            e.continue_with = continue_with
            raise


def outcome_of(state: dict[str, Any], info: dict[str, Any], run_id: str, run_name: str, wall: float,
               checkpoint_path: str) -> Outcome:
    selection = state["selection"]
    return Outcome(run_id=run_id, run_name=run_name, selected_epoch=selection["epoch"],
                   selected_top1=selection["test_top1"], last_top1=state["history"][-1]["test/top1"],
                   val_top1=selection["val_top1"] if info["val_keys"] is not None else None,
                   ece_selected=selection.get("test_ece", float("nan")),  # absent in older checkpoints
                   wall_time_s=wall, checkpoint_path=checkpoint_path, history=state["history"])


def end_record(uri: str, run_id: str, run_name: str, config: dict[str, Any], info: dict[str, Any],
               outcome: Outcome, state: dict[str, Any], unlogged: list[int]) -> dict[str, Any]:
    """What the end of the run logs (:func:`pipeline.tracking.outage.finish_logging`), kept beside the final
    checkpoint until it is logged."""
    return {"tracking_uri": uri, "run_id": run_id, "run_name": run_name, "config": config,
            "image_shape": info["image_shape"], "final_metrics": outcome.final_metrics(),
            "final_step": len(state["history"]), "final_timestamp_ms": int(time.time() * 1000),
            "tags": {"selected_epoch": outcome.selected_epoch,
                     "selected_by": "val/top1" if outcome.val_top1 is not None else "last epoch"},
            "unlogged_epochs": unlogged,
            "pending": [s for s in outage.LOG_STEPS if s != "epochs" or unlogged]}


RUN_KEY_TAG = "run_key"  # storage/run_name of a named run: the same command finds and reopens its run


def storage_dir(config: dict[str, Any]) -> str:
    return storage.absolute(config["train"]["storage_path"])


def earlier_attempt(uri: str, experiment: str, run_key: str) -> str | None:
    """The MLflow run of an earlier attempt of this named run, to be continued; a ConfigError if that
    run finished (there is nothing to continue, and Ray would not train it again)."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    quoted = run_key.replace("'", "\\'")
    runs = c.search_runs([exp.experiment_id], f"tags.{RUN_KEY_TAG} = '{quoted}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run = runs[0]
    if run.info.status == "FINISHED":
        name = run_key.rsplit("/", 1)[1]
        raise config_lib.ConfigError(
            f"train.run_name={name}: that run already finished (MLflow run {run.info.run_id} in experiment "
            f"{experiment!r}); give another train.run_name to train a fresh run")
    log.info("continuing MLflow run %s (%s, was %s)", run.info.run_id, run_key, run.info.status)
    return run.info.run_id


def stopped_early(uri: str, run_id: str, state: dict[str, Any], unlogged: list[int], epochs: int,
                  checkpoint_path: str, continue_with: str) -> None:
    """The workers stopped on request and checkpointed: log what the controller could not, then end
    the run KILLED (:class:`stopping.Stopped`, raised here) with the command that continues it."""
    outage.log_unlogged_epochs(uri, run_id, state["history"], unlogged)
    done = state["epoch"] + 1
    raise stopping.Stopped(stopping.signals.requested or signal.SIGTERM,
                           f"after epoch {done} of {epochs} (checkpoint {checkpoint_path})", continue_with)


