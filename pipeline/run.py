"""The driver side of a training job: validate, share the teacher, launch Ray Train, log to MLflow.

``train(config)`` serves ``stkd teacher``, ``stkd distill``, the demo and every Tune trial.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline import checkpoint, config as config_lib, teacher_store, tracking, val_split
from pipeline.dataset import PreparedDataset

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A teacher loaded once on the driver and put once into the object store."""

    ref: Any
    uri: str
    spec: dict[str, Any]
    accuracy: float | None = None


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

    def final_metrics(self) -> dict[str, float]:
        out = {"final/test_top1_selected": self.selected_top1, "final/test_top1_last": self.last_top1,
               "final/selected_epoch": self.selected_epoch, "final/wall_time_s": self.wall_time_s,
               # The literature's figure (best epoch on the test split): optimistic, never used to choose.
               "final/test_top1_best_epoch_optimistic": max(h["test/top1"] for h in self.history)}
        if self.val_top1 is not None:
            out["final/val_top1_selected"] = self.val_top1
        return out


def dataset_info(config: dict[str, Any]) -> dict[str, Any]:
    """Open (and checksum) the prepared dataset once on the driver and carve the validation split;
    workers get only this summary (with the validation rows' keys)."""
    dataset = PreparedDataset.open(config["data"]["path"], verify=True)
    info = {"num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape), "mean": list(dataset.mean),
            "std": list(dataset.std), "train_rows": dataset.rows("train"), "test_rows": dataset.rows("test"),
            "val_rows": 0, "path": str(Path(config["data"]["path"]).resolve()), "val_keys": None,
            "val_positions": None}
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
        ray.init(log_to_driver=True, logging_level=logging.WARNING)


def load_teacher(config: dict[str, Any], info: dict[str, Any]) -> Teacher:
    """Load the teacher once, check it fits the dataset, measure its test accuracy, ``ray.put`` it once."""
    tracking.client(tracking.tracking_uri(config))  # a registered name is looked up in the run's own store
    state, uri = teacher_store.fetch(config["teacher"]["source"])
    spec = state["model"]
    if spec["num_classes"] != info["num_classes"] or spec["in_channels"] != info["image_shape"][2]:
        raise config_lib.ConfigError(
            f"teacher {uri} was trained for {spec['num_classes']} classes and {spec['in_channels']} channels; "
            f"dataset {info['path']} has {info['num_classes']} classes and {info['image_shape'][2]} channels")
    accuracy = None
    if config["teacher"]["evaluate"]:
        model = checkpoint.build_model(spec)
        model.load_state_dict(state["student"])
        images, labels = PreparedDataset.open(info["path"], verify=False).load_numpy("test")
        accuracy = teacher_store.accuracy(model, images, labels, info["mean"], info["std"],
                                          config["data"]["eval_batch_size"])
        log.info("teacher %s (%s): test top-1 %.2f%%", uri, spec["name"], accuracy)
    return Teacher(ref=teacher_store.put(state), uri=uri, spec=spec, accuracy=accuracy)


def make_trainer(config: dict[str, Any], loop_context: dict[str, Any], run_name: str, callbacks=None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data_feed import ray_datasets, unequal_split_data_config
    from pipeline.train_loop import train_loop_per_worker

    train_cfg = config["train"]
    resources = {"CPU": train_cfg["cpus_per_worker"]}
    if train_cfg["use_gpu"]:
        resources["GPU"] = train_cfg["gpus_per_worker"]
    datasets, data_config = None, None
    if not config["data"]["in_memory"]:
        dataset = PreparedDataset.open(config["data"]["path"], verify=False)
        info = loop_context["dataset_info"]
        val = (info["val_keys"], config["data"]["val_seed"]) if info["val_keys"] is not None else None
        datasets = ray_datasets(dataset, train_cfg["workers"], val)
        data_config = unequal_split_data_config()
    storage = train_cfg["storage_path"]
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_context,
        scaling_config=ScalingConfig(num_workers=train_cfg["workers"], use_gpu=train_cfg["use_gpu"],
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=train_cfg["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
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
    resume_run_id: str | None = None,
) -> Outcome:
    """Run one training job end to end and log it as one MLflow run.

    ``teacher``: an already shared teacher (a sweep shares one across trials); otherwise the
    config's ``teacher.source`` is loaded here. ``callbacks``: Ray Train callbacks (a Tune trial
    passes the one that forwards each epoch's report to Tune). ``resume_run_id``: the MLflow run of
    this run's earlier attempt (a restarted Tune trial), continued rather than a second one started.
    """
    config = config_lib.validate(config)
    info = dataset_info(config)
    ensure_ray()
    if teacher is None and config["teacher"]["source"]:
        teacher = load_teacher(config, info)
    run_name = config_lib.new_run_name(config, teacher.spec["name"] if teacher else None)
    uri = tracking.tracking_uri(config)
    tags = {"method": config["method"]["name"], "student": config["model"]["student"], "dataset": info["path"],
            "seed": str(config["train"]["seed"]), "workers": str(config["train"]["workers"]),
            "train_rows": str(info["train_rows"]), "val_rows": str(info["val_rows"]), **(extra_tags or {})}
    if teacher is not None:
        tags.update({"teacher_uri": teacher.uri, "teacher_model": teacher.spec["name"],
                     "teacher_object_id": teacher.ref.hex()})
        if teacher.accuracy is not None:
            tags["teacher_test_top1"] = f"{teacher.accuracy:.2f}"
    start = time.perf_counter()
    with tracking.tracked_run(uri, config["mlflow"]["experiment"], run_name, config_lib.flatten(config), tags,
                              parent_run_id, resume_run_id) as run_id:
        if teacher is not None and teacher.accuracy is not None and not resume_run_id:
            tracking.log_metrics(uri, run_id, {"teacher/test_top1": teacher.accuracy}, step=0)
        loop_context = {"config": config, "dataset_info": info, "teacher_ref": teacher.ref if teacher else None}
        log.info("run %s: %s %s on %s with %d worker(s)", run_name, config["method"]["name"],
                 config["model"]["student"], info["path"], config["train"]["workers"])
        from pipeline.epoch_logger import EpochLogger

        epoch_logger = EpochLogger(uri, run_id)
        if resume_run_id:  # epochs the earlier attempt logged after its last checkpoint are trained again
            epoch_logger.logged.update(logged_epochs(uri, run_id))
        callbacks = [epoch_logger, *(callbacks or [])]
        result = make_trainer(config, loop_context, run_name, callbacks).fit()
        wall = time.perf_counter() - start
        with result.checkpoint.as_directory() as directory:
            state = checkpoint.load(directory)
        selection = state["selection"]
        outcome = Outcome(run_id=run_id, run_name=run_name, selected_epoch=selection["epoch"],
                          selected_top1=selection["test_top1"], last_top1=state["history"][-1]["test/top1"],
                          val_top1=selection["val_top1"] if info["val_keys"] is not None else None,
                          wall_time_s=wall, checkpoint_path=result.checkpoint.path, history=state["history"])
        tracking.log_metrics(uri, run_id, outcome.final_metrics(), step=len(state["history"]))
        tracking.set_tags(uri, run_id, {"selected_epoch": selection["epoch"],
                                        "selected_by": "val/top1" if outcome.val_top1 is not None else "last epoch"})
        outcome.model_uri = log_artifacts(config, state, run_name, info["image_shape"])
    return outcome


def logged_epochs(uri: str, run_id: str) -> set[int]:
    return {m.step for m in tracking.client(uri).get_metric_history(run_id, "test/top1")}


def log_artifacts(config: dict[str, Any], state: dict[str, Any], run_name: str, image_shape: list[int]) -> str:
    """The resolved recipe, the learning curve and the final student (an MLflow PyTorch model)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(config, sort_keys=False))
        mlflow.log_artifact(str(recipe))
        curve = tracking.learning_curve(state["history"], tmp / "learning_curve.png",
                                        f"{run_name}: {config['method']['name']} {config['model']['student']}")
        mlflow.log_artifact(str(curve))
        # The selected epoch's student, not necessarily the last one.
        selected = state["selection"]
        model = checkpoint.build_model(state["model"])
        model.load_state_dict(selected["student"])
        weights = checkpoint.save({"model": state["model"], "student": selected["student"],
                                   "selected_epoch": selected["epoch"], "test_top1": selected["test_top1"]},
                                  tmp / "weights")
        spec = state["model"]
        h, w = image_shape[0], image_shape[1]
        example = np.zeros((2, spec["in_channels"], h, w), dtype=np.float32)  # batch 1 would be specialized
        info = mlflow.pytorch.log_model(model.eval(), name="model", extra_files=[str(weights)],
                                        pip_requirements=["torch"], input_example=example,
                                        registered_model_name=config["mlflow"]["register_as"])
    return info.model_uri

