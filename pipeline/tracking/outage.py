"""What the end of a run logs to MLflow (the epochs the controller could not log, final metrics and tags,
artifacts and model, status FINISHED), one step at a time, waiting for a tracking server that is away;
and ``stkd log-run``, which logs what is still pending later from the final checkpoint."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage, tracking
from pipeline.data.dataset import PreparedDataset
from pipeline.train import checkpoint, teachers

log = logging.getLogger(__name__)


def log_unlogged_epochs(uri: str, run_id: str, history: list[dict[str, float]], unlogged: list[int]) -> None:
    """Log from the checkpoint's history the epochs the controller could not, unless the run has them."""
    by_epoch = {int(h["epoch"]): h for h in history}
    have = logged_epochs(uri, run_id)
    for epoch in unlogged:
        if epoch not in have and epoch in by_epoch:
            tracking.log_metrics(uri, run_id, {k: v for k, v in by_epoch[epoch].items() if k != "epoch"}, epoch)


def logged_epochs(uri: str, run_id: str) -> set[int]:
    return {m.step for m in tracking.client(uri).get_metric_history(run_id, "loss/total")}  # every epoch logs it


# What the end of a run logs, in this order; a step done is not done again (``stkd log-run``).
LOG_STEPS = ("epochs", "final", "artifacts", "status")
RUN_FILE = "mlflow_run.json"  # beside the final checkpoint: what ``stkd log-run`` needs, and what is still pending


def finish_logging(record: dict[str, Any], state: dict[str, Any], wait_s: float, path: str) -> str | None:
    """Log the end of a run (the epochs the controller could not log, final metrics and tags, artifacts
    and model, status FINISHED), waiting up to ``wait_s`` for a tracking server that is away.

    ``record`` (written beside the checkpoint at ``path``, a local path or a URI such as ``s3://...``, before
    the first step and after the last) says which steps are pending. Returns the model URI when this call logged the model. Raises
    :class:`tracking.TrackingIncomplete` saying what was not logged and how to log it later.
    """
    uri, run_id = record["tracking_uri"], record["run_id"]
    deadline = time.monotonic() + wait_s
    write_json(f"{path}/{RUN_FILE}", record)
    model_uri = None
    for step in list(record["pending"]):
        try:
            done = tracking.when_reachable(uri, describe_step(step, record), lambda: log_step(step, record, state),
                                           deadline)
        except tracking.TrackingUnavailable as e:
            write_json(f"{path}/{RUN_FILE}", record)
            missing = "; ".join(describe_step(s, record) for s in record["pending"])
            raise tracking.TrackingIncomplete(
                f"the model is trained, but MLflow at {uri} did not answer for {wait_s:.0f} s "
                f"(mlflow.outage_wait_s). Not logged to run {run_id} ({record['run_name']}): {missing}.\n"
                f"  last error: {tracking.first_line(e.__cause__ or e)}\n"
                f"  checkpoint: {path}\n"
                f"  log it once the server answers: stkd log-run {path}") from None
        record["pending"].remove(step)
        if step == "artifacts":
            model_uri = done
    write_json(f"{path}/{RUN_FILE}", record)
    return model_uri


def log_step(step: str, record: dict[str, Any], state: dict[str, Any]) -> str | None:
    import mlflow

    uri, run_id = record["tracking_uri"], record["run_id"]
    c = tracking.client(uri)
    if step == "epochs":
        log_unlogged_epochs(uri, run_id, state["history"], record["unlogged_epochs"])
    elif step == "final":
        tracking.log_metrics(uri, run_id, record["final_metrics"], step=record["final_step"],
                             timestamp_ms=record["final_timestamp_ms"])
        tracking.set_tags(uri, run_id, record["tags"])
    elif step == "artifacts":
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:  # `stkd log-run`: reopen the run in this process
            mlflow.start_run(run_id=run_id)
        return log_artifacts(record["config"], state, record["run_name"], record["image_shape"], uri)
    elif step == "status":
        c.set_terminated(run_id, "FINISHED")
    return None


def describe_step(step: str, record: dict[str, Any]) -> str:
    if step == "epochs":
        return f"the metrics of epochs (steps) {compact(record['unlogged_epochs'])}"
    if step == "final":
        return f"the final metrics ({', '.join(record['final_metrics'])}) and tags ({', '.join(record['tags'])})"
    if step == "artifacts":
        name = record["config"]["mlflow"]["register_as"]
        return "recipe.yaml, learning_curve.png and the model" + (f" (to be registered as {name})" if name else "")
    return "the status FINISHED"


def compact(steps: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2, 5, 7-8``."""
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def log_later(path: str, wait_s: float) -> tuple[dict[str, Any], list[str], str | None]:
    """``stkd log-run``: log into the same MLflow run what a run could not log (its checkpoint's
    ``mlflow_run.json`` says what), from the checkpoint. Returns the record, what was logged now, and
    the model URI if the model was."""
    import mlflow
    from ray.train import Checkpoint

    ckpt = Checkpoint(storage.absolute(path))
    with ckpt.as_directory() as directory:
        record = read_json(Path(directory) / RUN_FILE)
        if record is None:
            raise checkpoint.CheckpointError(
                f"{path} has no {RUN_FILE}: give the final checkpoint of a `stkd teacher`/`stkd distill` run "
                "(the path its message printed)")
        state = checkpoint.load(directory)
    logged = [describe_step(s, record) for s in record["pending"]]
    if not logged:
        return record, [], None
    with tracking.using(record["tracking_uri"]):  # the artifacts step reopens the run as the active run
        try:
            model_uri = finish_logging(record, state, wait_s, storage.absolute(path))
        finally:
            if mlflow.active_run() is not None:  # opened (status RUNNING) by the artifacts step
                status = "FAILED" if record["pending"] else "FINISHED"
                tracking.unless_away(record["tracking_uri"], f"the run's status {status}",
                                     lambda: mlflow.end_run(status))
    return record, logged, model_uri


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: str, data: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(data, indent=1, default=str))


def log_artifacts(config: dict[str, Any], state: dict[str, Any], run_name: str, image_shape: list[int],
                  tracking_uri: str) -> str:
    """The resolved recipe, the learning curve and the final student (an MLflow PyTorch model), into the
    active run."""
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
        info = tracking.log_model({"model": state["model"], "student": selected["student"],
                                   "selected_epoch": selected["epoch"], "test_top1": selected["test_top1"]},
                                  image_shape, config["mlflow"]["register_as"])
        if info.registered_model_version is not None:  # its accuracy on the version; `champion` if it is the best
            manifest = PreparedDataset.open(config["data"]["path"], verify=False).manifest
            teachers.record_version(config["mlflow"]["register_as"], info.registered_model_version,
                                    selected["test_top1"], tracking_uri,
                                    {teachers.DATA_TAG: tracking.dataset_digest(manifest)})
    return info.model_uri

