"""Tracking outages never fail or stall training.

Against the real ``mlflow server`` as ``cluster/local/mlflow_server.sh`` starts it (SQLite store, served
artifacts) on a free port, stopped by ``cluster/local/stop.sh`` (by its recorded PID) in the middle of a
``stkd teacher`` run and started again on the same port and store. MLflow's own HTTP retry window is
shortened in the job (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``..._BACKOFF_FACTOR``) so the outage outlasts it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import pytest

from pipeline import config, tracking
from pipeline.tracking import epoch_logger
from ray_nodes import port_block
from s3_store import BUCKET as S3_BUCKET, keys as s3_keys
from slow_proxy import DelayingProxy

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "cluster" / "local"


@pytest.fixture
def closed() -> Iterator[str]:
    """The address of a port this test holds bound without listening: connections are refused at once, and
    nothing else can take the port while the test runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


class Server:
    """The project's MLflow server script, on one port and one state folder, stopped and started again.
    The port comes from the tests' allocator, below the ephemeral range where clients' ports are drawn,
    so it is still free when the server starts again."""

    def __init__(self, state: Path) -> None:
        self.state, self.port = state, port_block(span=1)
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run([str(LOCAL / "mlflow_server.sh"), "--state", str(self.state), "--port", str(self.port),
                        "--workers", "1"], check=True, capture_output=True, timeout=150)

    def stop(self) -> None:
        subprocess.run([str(LOCAL / "stop.sh"), "--mlflow-only", "--state", str(self.state)], check=True,
                       capture_output=True, timeout=60)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-state"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def server(module_server):
    """The module's server, answering when each test starts: a test that failed while it was stopped leaves
    the next test a server, not a cascade of failures."""
    if not module_server.answers():
        module_server.stop()  # whatever is left of it, by its recorded PID
        module_server.start()
    return module_server


def stkd(args: list[str], server: Server, ray_session, log: Path, **extra_env: str) -> subprocess.Popen:
    """A ``stkd`` command as a user runs it, on the session's Ray (unless ``extra_env`` names another RAY_ADDRESS),
    logging to ``server``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           # MLflow's own retries: about 3 s instead of about 4 minutes, so a 15 s outage outlasts them.
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", **extra_env}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=log.parent, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_text(job: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    """Until ``text`` (a regular expression) appears in the job's output."""
    deadline = time.monotonic() + timeout
    while not re.search(text, log.read_text()):
        assert job.poll() is None, f"job ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def wait_for_epoch(job: subprocess.Popen, log: Path, epoch: int, epochs: int) -> None:
    """Wait until the driver has printed epoch N (1-based) of M."""
    wait_for_text(job, log, rf"epoch +{epoch}/{epochs} ")


def run_of(uri: str, experiment: str):
    c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the registry another test made global
    exp = c.get_experiment_by_name(experiment)
    (run,) = c.search_runs([exp.experiment_id])
    return c, run


def assert_every_epoch_once(c, run_id: str, epochs: int) -> None:
    for key in ("loss/total", "test/top1", "train/acc", "lr", "images_per_s"):
        steps = sorted(m.step for m in c.get_metric_history(run_id, key))
        assert steps == list(range(epochs)), (key, steps)


# --- without Ray: the pieces ---------------------------------------------------------------------


def test_a_server_that_is_away_fails_fast_and_is_waited_for_until_the_deadline(closed, monkeypatch):
    tries = []
    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 0.2)
    with pytest.raises(tracking.TrackingUnavailable, match="did not answer"):
        # MLflow alone would retry each call for minutes: here each try is one refused connection.
        tracking.when_reachable(closed, "a test", lambda: tries.append(1) or tracking.client(closed).search_experiments(),
                                time.monotonic() + 2)
    assert len(tries) >= 3  # tried again until the deadline, not once with MLflow's own retries
    tracking.unless_away(closed, "a tag", lambda: tracking.client(closed).set_tag("0" * 32, "k", "v"))  # no raise


def test_a_real_error_is_not_mistaken_for_an_outage(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(mlflow.exceptions.MlflowException):  # no such run: raised at once, not waited on
        tracking.when_reachable(uri, "a test", lambda: tracking.client(uri).get_run("0" * 32), time.monotonic() + 60)


def test_epoch_logger_queues_while_away_and_logs_each_epoch_once_when_back(tmp_path, closed):
    from ray.train import Checkpoint

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "outage-unit")).info.run_id
    logger = epoch_logger.EpochLogger(closed, run_id)
    (tmp_path / "ckpt").mkdir()
    logger.after_report(None, [{"epoch": 0, "loss/total": 2.0}, {"epoch": 0, "loss/total": 9.0}], None)
    logger.after_report(None, [{"epoch": 1, "loss/total": 1.5}], Checkpoint(str(tmp_path / "ckpt")))
    assert sorted(logger.queued) == [0, 1] and logger.trouble == "away"
    assert logger.calls == 2  # away (refused at once): tried at every report, no backoff
    assert json.loads((tmp_path / "ckpt" / epoch_logger.UNLOGGED_FILE).read_text())["epochs"] == [0, 1]
    logger.tracking_uri = uri  # the server is back
    logger.after_report(None, [{"epoch": 1, "loss/total": 1.5}], None)  # a repeated report adds nothing
    logger.after_report(None, [{"epoch": 2, "loss/total": 1.0}], None)
    assert not logger.queued
    history = c.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.0), (1, 1.5), (2, 1.0)]


def queued_epochs(epochs: range, metrics: int = 12) -> dict[int, tuple[int, dict[str, float]]]:
    return {e: (1_000 + e, {f"m{k:02d}": e + k / 100 for k in range(metrics)}) for e in epochs}


def test_a_backlog_goes_out_in_order_in_batches_of_whole_epochs(tmp_path, closed, monkeypatch):
    """While the server is slow, each try sends the oldest epochs that fit one request; once it keeps up,
    the rest goes in one call (MLflow's client splits it into requests of at most 1,000 metrics)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = tracking.client(uri)
    run_id = c.create_run(tracking.experiment_id(c, "outage-batches")).info.run_id
    now = [0.0]
    logger = epoch_logger.EpochLogger(uri, run_id, clock=lambda: now[0])
    logger.queued = queued_epochs(range(200))
    sent = []
    real = tracking.log_epochs
    monkeypatch.setattr(tracking, "log_epochs", lambda u, r, epochs: sent.append(sorted(epochs)) or real(u, r, epochs))
    logger.slow("a test")
    assert logger.backoff_s == logger.FIRST_BACKOFF_S
    logger.flush()
    assert sent == []  # within the backoff: nothing sent
    now[0] += logger.backoff_s
    logger.flush()
    assert sent == [list(range(83))]  # 83 epochs x 12 metrics = 996 <= 1,000; the oldest first
    assert logger.trouble is None  # it answered quickly: back to sending everything at each report
    logger.flush()
    assert sent[1] == list(range(83, 200)) and not logger.queued
    for k in (0, 11):
        history = c.get_metric_history(run_id, f"m{k:02d}")
        assert sorted(m.step for m in history) == list(range(200)), k


def test_a_slow_server_is_backed_off_more_each_time_and_reset_when_it_keeps_up(tmp_path):
    now = [0.0]
    logger = epoch_logger.EpochLogger("http://unused", "0" * 32, clock=lambda: now[0])
    backoffs = []
    for _ in range(8):
        logger.slow("a test")
        backoffs.append(logger.backoff_s)
    assert backoffs == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert logger.next_try == now[0] + 60.0


@pytest.mark.e2e
def test_a_slow_server_is_not_taken_for_one_that_is_away(server, caplog):
    """A real MLflow server behind a loopback proxy that holds each answer: while its answers take longer
    than the request timeout the logger backs off (few calls, metrics queued, "slow" and never "could not
    log"); once they come in time, the queue drains in order, every epoch stored once, although the
    server had stored the timed-out batch already."""
    with DelayingProxy(server.uri) as proxy:
        c = tracking.client(server.uri)
        run_id = c.create_run(tracking.experiment_id(c, "slow-server")).info.run_id
        logger = epoch_logger.EpochLogger(proxy.uri, run_id, timeout_s=1)
        logger.FIRST_BACKOFF_S = 1.0
        caplog.set_level("WARNING", logger=epoch_logger.__name__)
        proxy.delay_s = 3.0  # longer than the 1 s timeout
        for epoch in range(6):
            logger.after_report(None, [{"epoch": epoch, "loss/total": 10.0 - epoch}], None)
            time.sleep(0.1)
        assert logger.trouble == "slow" and sorted(logger.queued) == list(range(6))
        assert logger.calls < 6  # backed off: not one timed-out call per report
        proxy.wait_for_answers()  # the server stored the timed-out batches meanwhile: epoch 0 at least
        steps = sorted(m.step for m in c.get_metric_history(run_id, "loss/total"))
        assert steps and steps == list(range(len(steps))), steps  # each once, though some were sent twice
        proxy.delay_s = 0.0
        time.sleep(logger.backoff_s)
        logger.after_report(None, [{"epoch": 6, "loss/total": 4.0}], None)
        assert not logger.queued and logger.trouble is None
    history = sorted(c.get_metric_history(run_id, "loss/total"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(e, 10.0 - e) for e in range(7)]  # each once
    messages = [r.getMessage() for r in caplog.records]
    assert any("is slow (no answer within 1 s)" in m for m in messages), messages
    assert any("keeps up again" in m for m in messages), messages
    assert not any("could not log" in m for m in messages), messages


def test_outage_wait_is_checked():
    with pytest.raises(config.ConfigError, match="mlflow.outage_wait_s: must be >= 0"):
        config.load("test_tiny", ["data.path=x", "mlflow.outage_wait_s=-1"])


# --- end to end: the real server stopped in the middle of a run ----------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_server_away_mid_run_and_back(server, ray_session, digits, tmp_path):
    """Away for longer than MLflow's retry window while epochs go on: exit 0, FINISHED, every epoch once."""
    epochs, log = 12, tmp_path / "job.log"
    job = stkd(["teacher", "--recipe", "test_tiny", f"data.path={digits}", f"train.storage_path={tmp_path / 'runs'}",
                f"optim.epochs={epochs}", "mlflow.experiment=outage-back", "mlflow.register_as=outage-back"],
               server, ray_session, log)
    try:
        wait_for_epoch(job, log, 1, epochs)  # early: a fast machine must not log all 12 before the stop
        stopped = time.monotonic()
        server.stop()
        # Ray Train's controller takes the workers' reports a little behind them: the server stays away
        # until the epoch logger has met it away, and for longer than MLflow's own retries.
        wait_for_text(job, log, "could not log epoch metrics")
        wait_for_epoch(job, log, 4, epochs)  # training went on meanwhile
        time.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
        server.start()
        assert job.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    c, run = run_of(server.uri, "outage-back")
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(c, run.info.run_id, epochs)
    assert "final/test_top1_selected" in run.data.metrics
    assert c.search_model_versions("name='outage-back'")
    assert "is back after" in text and "ControllerError" not in text


@pytest.mark.slow
@pytest.mark.e2e
def test_server_that_never_returns_then_stkd_log_run(server, ray_session, s3_env, digits, tmp_path):
    """The end of the run gives up after mlflow.outage_wait_s, says what was not logged and how to log it;
    that command logs it into the same run once the server is back. The run's storage is on S3 (README:
    `stkd teacher` checkpoints and `stkd log-run` take an s3:// storage path): the checkpoint and the record
    of what was not logged are read back from there."""
    epochs, log = 10, tmp_path / "job.log"  # room for the stop to land before the end on a fast machine
    storage = f"s3://{S3_BUCKET}/outage-runs"
    # Its own Ray (RAY_ADDRESS=local), which inherits the AWS variables: the session's Ray workers have none, as
    # a cluster's nodes would have their own (an IAM role) rather than the submitting shell's.
    s3 = {**s3_env, "RAY_ADDRESS": "local"}
    job = stkd(["teacher", "--recipe", "test_tiny", f"data.path={digits}", f"train.storage_path={storage}",
                f"optim.epochs={epochs}", "mlflow.experiment=outage-never", "mlflow.register_as=outage-never",
                "mlflow.outage_wait_s=3"], server, ray_session, log, **s3)
    try:
        wait_for_epoch(job, log, 1, epochs)
        server.stop()
        assert job.wait(timeout=180) == 3, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert "the model is trained, but MLflow at" in text and "did not answer for 3 s" in text
    # The last epoch was not logged; how many before it depends on how fast the server went away.
    assert re.search(rf"the metrics of epochs \(steps\) (?:\d+-)?{epochs - 1}\b", text)
    assert "recipe.yaml, learning_curve.png and the model (to be registered as outage-never)" in text
    assert "the status FINISHED" in text
    checkpoint_path = re.search(r"log it once the server answers: stkd log-run (\S+)", text).group(1)
    assert checkpoint_path.startswith(f"{storage}/")
    kept = s3_keys(s3_env, checkpoint_path.removeprefix(f"s3://{S3_BUCKET}/"))
    assert any(k.endswith("/checkpoint.pt") for k in kept), kept  # the trained model is kept, on S3

    server.start()
    c, run = run_of(server.uri, "outage-never")
    assert run.info.status != "FINISHED" and "final/test_top1_selected" not in run.data.metrics
    later = stkd(["log-run", checkpoint_path], server, ray_session, tmp_path / "later.log", **s3)
    assert later.wait(timeout=120) == 0, (tmp_path / "later.log").read_text()[-3000:]
    assert "logged the metrics of epochs" in (tmp_path / "later.log").read_text()
    run = c.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert_every_epoch_once(c, run.info.run_id, epochs)
    assert "final/test_top1_selected" in run.data.metrics and run.data.tags["selected_by"] == "last epoch"
    assert {"recipe.yaml", "learning_curve.png"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    assert c.search_model_versions("name='outage-never'")
    again = stkd(["log-run", checkpoint_path], server, ray_session, tmp_path / "again.log", **s3)
    assert again.wait(timeout=120) == 0 and "nothing left to log" in (tmp_path / "again.log").read_text()
