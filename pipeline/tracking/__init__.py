"""MLflow: one run per job, the whole config as params, per-epoch metrics, a learning-curve plot.

Only the driver and the rank-0 worker write. ``tracked_run`` guarantees a run never stays RUNNING:
it ends FINISHED, FAILED, or KILLED (interrupted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pipeline import ROOT, compat

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
# While the server is away: one quick try (no MLflow retries, a short timeout), then another every few seconds.
QUICK_TIMEOUT_S = 5
RETRY_EVERY_S = 5.0
# How long a run's start waits for a server that does not answer (or a call that failed on the client's
# side, such as MLflow 3.17's telemetry thread removing its variable from os.environ while a request reads
# it, seen in bench/tracking_load.py) before the run fails.
START_WAIT_S = 60.0

T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the time allowed."""


class TrackingIncomplete(RuntimeError):
    """The model is trained and checkpointed, but part of the run could not be logged (the message says
    what, and the command that logs it later)."""


def tracking_uri(config: dict[str, Any] | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the config's, else a SQLite file in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (config or {}).get("mlflow", {}).get("tracking_uri")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str):
    """A client of the store at ``uri`` (its runs and its model registry); sets nothing process-wide."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """MLflow's fluent API (the active run, ``log_artifact``, ``log_model``) and its ``models:/`` downloads
    read only its process-wide tracking and registry URIs: inside this block both are ``uri``; after it,
    they and the variables their setters write (MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI, which
    subprocesses inherit) are as they were."""
    import mlflow

    before, variables = compat.mlflow_global_uris(), {key: os.environ.get(key) for key in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for key, value in variables.items():  # the setters wrote (or removed) them
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def git_commit() -> str:
    """The git commit of the code; ``STKD_GIT_COMMIT`` where the code travelled without .git (a
    ``ray job submit`` working dir), else a hash of the sources so runs of different code differ."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("STKD_GIT_COMMIT"):
        return os.environ["STKD_GIT_COMMIT"]
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("stkd/**/*.py"), *ROOT.glob("pipeline/**/*.py")]):
        digest.update(path.read_bytes())
    return f"source-sha256:{digest.hexdigest()[:16]}"


def version_tags() -> dict[str, str]:
    import ray
    import torch

    commit = git_commit()
    # mlflow.source.git.commit fills the UI's source column; git_commit stays for earlier runs' queries.
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "ray_version": ray.__version__,
            "torch_version": torch.__version__}


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on training runs


def experiment_id(mlflow_client, name: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        return mlflow_client.create_experiment(name, tags=EXPERIMENT_TAGS)
    if any(exp.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):  # created before the tag existed
        for key, value in EXPERIMENT_TAGS.items():
            mlflow_client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def dataset_digest(manifest: dict[str, Any]) -> str:
    """A short digest of a prepared dataset's content: its shards' sha256 sums, from the manifest."""
    import hashlib
    import json

    shards = {split: [s["sha256"] for s in part["shards"]] for split, part in manifest["splits"].items()}
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:12]


def log_dataset(run_id: str, name: str, path: str, digest: str, profile: dict[str, Any]) -> None:
    """The prepared dataset as the run's MLflow input (the UI's Datasets column and lineage), with
    its split sizes as the profile. The run must be this process's active run."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    assert mlflow.active_run() and mlflow.active_run().info.run_id == run_id
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns it matched both
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(path)
    dataset = compat.dataset_input_with_profile(source, name, digest, profile)
    try:
        mlflow.log_input(dataset, context="training")
    except MlflowException as e:
        # Two runs of one experiment logging the same new dataset at once (a sweep's first trials; seen in
        # test_stopping's study). The row is there now: once more links it to this run.
        if not is_unique_key_race(e):
            raise
        log.info("dataset %s was being logged by another run at the same moment; logging it again", name)
        mlflow.log_input(dataset, context="training")


def is_unique_key_race(error: Exception) -> bool:
    """MLflow's SQL store looks a row up, then inserts it (a dataset, a tag): two processes writing the same
    new row at once can both insert, and the second fails on the unique key. The row exists afterwards."""
    return any(text in str(error) for text in ("IntegrityError", "UniqueViolation", "UNIQUE constraint"))


STOP_TAGS = frozenset({"end_reason", "continue_with"})
# Set on a Tune trial's run when the scheduler stops it; the sweep's driver then writes the run's ending.
SCHEDULER_STOP_TAG = "stopped_by_scheduler"


@contextlib.contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """Start a run (the active MLflow run in this process), yield its id, and always end it:
    FINISHED on success, KILLED when a signal stopped it (``stopping.Stopped``: the ``continue_with`` tag
    says how to continue), FAILED on any other error or interrupt, with the reason in the ``end_reason`` tag.
    ``resume_run_id`` reopens an earlier run (a resumed sweep keeps its parent run)."""
    import mlflow
    from mlflow.entities import Param

    with using(uri):  # the run is this process's active run: the fluent API's store is its store
        c = client(uri)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
            for stale in STOP_TAGS.intersection(run.data.tags):  # the earlier attempt's end, continued now
                c.delete_tag(resume_run_id, stale)
        else:
            # Nested when this process already has an active run: the demo's runs inside its parent run.
            run = mlflow.start_run(experiment_id=experiment_id(c, experiment), run_name=run_name,
                                   tags={**version_tags(), **(tags or {})}, parent_run_id=parent_run_id,
                                   nested=mlflow.active_run() is not None)
        run_id = run.info.run_id
        status = "FAILED"
        try:
            params_list = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
            for start in range(0, len(params_list), 100):
                # Logging a param again with the same value is allowed: a call that failed is simply tried again.
                when_reachable(uri, "the run's params", lambda: c.log_batch(run_id, params=params_list[start:start + 100]),
                               time.monotonic() + START_WAIT_S, "a run's start")
            yield run_id
            status = "FINISHED"
        except BaseException as e:
            from pipeline.stopping import Stopped

            if stopped_by_scheduler(uri, run_id):
                # The error is the stop itself (the trial's trainer killed under it). The sweep's driver writes
                # why the run ended (trials.close_trial_runs), possibly before this dying process gets here:
                # the same status, and no end_reason that would overwrite the driver's.
                status = "KILLED"
                raise
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            ending = {"end_reason": reason[:5000]}
            if isinstance(e, Stopped):  # stopped on purpose, to be continued: KILLED, not FAILED
                status, ending["end_reason"] = "KILLED", str(e)
                if e.continue_with:
                    ending["continue_with"] = e.continue_with
            unless_away(uri, "the run's end_reason tag", lambda: set_tags(uri, run_id, ending))
            raise
        finally:
            if mlflow.active_run() and mlflow.active_run().info.run_id == run_id:
                unless_away(uri, f"the run's status {status}", lambda: mlflow.end_run(status))
            else:
                unless_away(uri, f"the run's status {status}", lambda: c.set_terminated(run_id, status))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
    """Log ``metrics`` at ``step``. The store drops a metric identical to one it holds (same key, step,
    value and ``timestamp_ms``), so a batch sent again with its original timestamp is logged once."""
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    log_epochs(uri, run_id, {step: (now, metrics)})


def log_epochs(uri: str, run_id: str, epochs: dict[int, tuple[int, dict[str, float]]]) -> None:
    """Log several steps' metrics in one ``log_batch`` (``step -> (timestamp ms, metrics)``); MLflow's
    client sends it in requests of at most 1,000 metrics. Sent again after a timeout, the metrics the
    server had stored are dropped as identical (see :func:`log_metrics`)."""
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), timestamp, step) for step, (timestamp, metrics) in epochs.items()
             for k, v in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def no_pickle_warning(record: logging.LogRecord) -> bool:
    return "Pickle or CloudPickle" not in record.getMessage()


def log_model(weights: dict[str, Any], image_shape: list[int] | tuple[int, ...], register_as: str | None):
    """Log a zoo model to the active run as an MLflow PyTorch model, with our weights file beside it
    (``checkpoint.save`` format: ``model`` spec and ``student`` state dict), and register it.

    Pickled with the ``stkd`` model code alongside, so it loads without this package installed;
    MLflow's default format (torch.export, "pt2") traces the model, seconds per run where this takes
    a fraction of one. The signature is declared rather than inferred from an input example, which
    MLflow would run through the model and check by loading the logged model back."""
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    import stkd
    from pipeline.train import checkpoint

    if os.environ.get("STKD_VERBOSE") != "1":  # also in a sweep's trial processes, which run no CLI
        # Said once in the README (the logged model is a pickle: load it from a store you trust), not every run.
        logging.getLogger("mlflow.pytorch").addFilter(no_pickle_warning)  # the same filter is added once
    spec = weights["model"]
    model = checkpoint.build_model(spec)
    model.load_state_dict(weights["student"])
    h, w = image_shape[0], image_shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["in_channels"], h, w))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]))]))
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(weights, Path(tmp) / "weights")
        return mlflow.pytorch.log_model(model.eval(), name="model", extra_files=[str(path)], pip_requirements=["torch"],
                                        signature=signature, serialization_format="pickle",
                                        code_paths=[str(Path(stkd.__file__).parent)], registered_model_name=register_as)


@contextlib.contextmanager
def quick_requests(timeout_s: int = QUICK_TIMEOUT_S) -> Iterator[None]:
    """MLflow HTTP calls that fail at once when the server is away, instead of retrying for minutes.

    MLflow reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` at each request;
    the callers here do their own waiting (:func:`when_reachable`) or keep what failed for later.
    """
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_outage(error: BaseException) -> bool:
    """A failure that waiting may cure: no connection, a timeout, a 5xx answer (a server restarting, a
    proxy without its backend), a server too busy to answer (:func:`is_slow`, including its 400 when its
    database connections ran out). Any other 4xx answer is a real error and is not waited on."""
    import requests
    from mlflow.exceptions import MlflowException

    if is_slow(error):  # a server too busy to answer in time is waited for like one that is away
        return True
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500
    if isinstance(error, requests.HTTPError):
        return error.response is None or error.response.status_code >= 500
    return isinstance(error, (requests.RequestException, ConnectionError, TimeoutError))


BUSY_STATUS_CODES = (429, 503, 504)  # too many requests, unavailable (overloaded), gateway timeout
# SQLAlchemy's error when every connection of the server's pool stayed busy for 30 s (an MLflow server on
# SQLite under many concurrent trials, bench/tracking_load.py), which MLflow 3.17 answers as BAD_REQUEST.
POOL_EXHAUSTED = "QueuePool limit of size"


def is_slow(error: BaseException) -> bool:
    """A server that is there but does not keep up: no answer within the request's timeout, or an answer
    that says it is busy. Distinct from one that is away (connection refused), where a try costs nothing."""
    import requests
    from mlflow.exceptions import MlflowException

    if any(timed_out(e) for e in causes(error)):
        return True
    if POOL_EXHAUSTED in str(error):  # MLflow's server answers 400 when its database connections run out
        return True
    if isinstance(error, MlflowException):
        return error.get_http_status_code() in BUSY_STATUS_CODES
    if isinstance(error, requests.HTTPError):
        return error.response is not None and error.response.status_code in BUSY_STATUS_CODES
    return False


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during (MLflow wraps what requests raised)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def timed_out(error: BaseException) -> bool:
    """A request timeout, as requests raises it, or (with retries off) urllib3's timeout inside the
    ``MaxRetryError`` that requests passes on as a ConnectionError."""
    import requests
    import urllib3

    def is_timeout(e: object) -> bool:
        # urllib3 makes a refused connection (NewConnectionError) a ConnectTimeoutError too, for old callers.
        return isinstance(e, requests.Timeout) or (isinstance(e, urllib3.exceptions.TimeoutError)
                                                   and not isinstance(e, urllib3.exceptions.NewConnectionError))

    reasons = [getattr(arg, "reason", None) for arg in getattr(error, "args", ())]
    return is_timeout(error) or any(is_timeout(r) for r in reasons)


def when_reachable(uri: str, what: str, action: Callable[[], T], deadline: float,
                   limit: str = "mlflow.outage_wait_s") -> T:
    """``action()`` (MLflow calls), tried again every few seconds while the server is away, until
    ``deadline`` (a ``time.monotonic()`` value); then :class:`TrackingUnavailable`. ``limit`` names what
    set the deadline, for the message."""
    waiting_since = None
    while True:
        try:
            with quick_requests():
                result = action()
            if waiting_since is not None:
                log.warning("tracking server %s is back after %.0f s: logged %s", uri,
                            time.monotonic() - waiting_since, what)
            return result
        except Exception as e:
            if not is_outage(e):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailable(f"{uri} did not answer ({first_line(e)})") from e
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.warning("tracking server %s unreachable while logging %s (%s); trying again every %.0f s "
                            "for up to %.0f s (%s)", uri, what, first_line(e), RETRY_EVERY_S, left, limit)
            time.sleep(min(RETRY_EVERY_S, left))


def stopped_by_scheduler(uri: str, run_id: str) -> bool:
    """Whether a Tune scheduler stopped this run's trial (False when the server cannot say)."""
    try:
        with quick_requests():
            return SCHEDULER_STOP_TAG in client(uri).get_run(run_id).data.tags
    except Exception as e:
        if not is_outage(e):
            raise
        return False


def unless_away(uri: str, what: str, action: Callable[[], Any]) -> None:
    """``action()`` once, quickly; a server that is away is logged as a warning, never raised."""
    try:
        with quick_requests():
            action()
    except Exception as e:
        if not is_outage(e):
            raise
        log.warning("tracking server %s unreachable: %s not logged (%s)", uri, what, first_line(e))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def learning_curve(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Loss terms, train and test accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    loss_keys = sorted({k for h in history for k in h if k.startswith("loss/")})
    for key in loss_keys:
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], label=key.removeprefix("loss/"))
    ax_loss.set(xlabel="epoch", ylabel="weighted loss term", title="loss terms")
    ax_loss.legend()
    for key, label in (("train/acc", "train (mixed batches: vs mixed labels)"), ("val/top1", "validation top-1"),
                       ("test/top1", "test top-1"), ("test/top5", "test top-5")):
        measured = [(h["epoch"] + 1, h[key]) for h in history if key in h]  # data.eval_every skips epochs
        if measured:
            ax_acc.plot(*zip(*measured), marker="." if len(measured) < len(history) else None, label=label)
    selected = history[-1].get("selected/epoch")
    if selected is not None:
        ax_acc.axvline(selected + 1, color="grey", linestyle=":", label=f"selected epoch ({int(selected) + 1})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy %", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def ui_hint(uri: str, experiment: str | None = None) -> str:
    """How to browse ``uri``: a server is opened in a browser; a local store through ``mlflow ui``.
    With an experiment name, the address of its training runs (MLflow's UI opens on its GenAI pages
    unless the address or the sidebar's switch says ``Model training``)."""
    page = ""
    if experiment:
        with contextlib.suppress(Exception):
            found = client(uri).get_experiment_by_name(experiment)
            if found:
                page = f"/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000{page}"
