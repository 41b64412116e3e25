"""Hardware use in MLflow (pipeline.tracking.system_metrics): real readings into a real SQLite store, without Ray."""

from __future__ import annotations

import logging
import socket
import sys
import time

from pipeline.tracking import system_metrics

NODE = "node-a_10.0.0.1"
CPU_AND_MEMORY = ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage")


def new_run(uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("system-metrics") or client.get_experiment(
        client.create_experiment("system-metrics"))
    return client.create_run(exp.experiment_id).info.run_id


def has_gpu() -> bool:
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    try:
        GPUMonitor()
        return True
    except Exception:
        return False


def wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readings_logged_per_node_and_resumed_steps(mlflow_uri):
    from mlflow import MlflowClient

    run_id = new_run(mlflow_uri)
    monitor = system_metrics.start(run_id, mlflow_uri, NODE, interval_s=0.2)
    assert monitor is not None
    wait_for(lambda: monitor.readings >= 3)
    system_metrics.stop(monitor)
    assert not monitor.alive()

    client = MlflowClient(tracking_uri=mlflow_uri)
    keys = set(client.get_run(run_id).data.metrics)
    assert all(k.startswith(f"system/{NODE}/") for k in keys), keys  # nothing without the node id
    for name in CPU_AND_MEMORY:
        history = client.get_metric_history(run_id, f"system/{NODE}/{name}")
        assert len(history) >= 3, (name, history)
        assert sorted(m.step for m in history) == list(range(len(history)))
        assert all(m.value >= 0 for m in history)
    assert all(m.value > 0 for m in client.get_metric_history(run_id, f"system/{NODE}/system_memory_usage_megabytes"))
    gpu_keys = {k for k in keys if "/gpu_" in k}
    if has_gpu():
        assert {f"system/{NODE}/gpu_0_{m}" for m in ("utilization_percentage", "memory_usage_megabytes",
                                                      "power_usage_watts")} <= gpu_keys
    else:
        assert not gpu_keys  # no GPU (or no nvidia-ml-py): absent, and nothing raised

    # A restarted worker group (or a resumed Tune trial) logs on into the same run from the next step.
    steps = len(client.get_metric_history(run_id, f"system/{NODE}/cpu_utilization_percentage"))
    monitor = system_metrics.start(run_id, mlflow_uri, NODE, interval_s=5.0)
    time.sleep(0.3)
    system_metrics.stop(monitor)  # a run shorter than the interval still gets its one reading, at the end
    history = client.get_metric_history(run_id, f"system/{NODE}/cpu_utilization_percentage")
    assert sorted(m.step for m in history) == list(range(steps + 1))


def test_readings_wait_while_the_server_is_away(mlflow_uri, monkeypatch, caplog):
    """An outage (the store's calls fail as a dead server's do): training's caller sees nothing, the readings
    wait, and reach the run, with the times they were taken, once the server answers again."""
    import requests
    from mlflow import MlflowClient

    real_log_batch = MlflowClient.log_batch
    away = {"now": True}

    def log_batch(self, *args, **kwargs):
        if away["now"]:
            raise requests.ConnectionError("Connection refused")
        return real_log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    run_id = new_run(mlflow_uri)
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.system_metrics")
    monitor = system_metrics.start(run_id, mlflow_uri, NODE, interval_s=0.1)
    wait_for(lambda: monitor.readings >= 3)
    assert monitor.logged_points == 0
    taken_before = int(time.time() * 1000)
    away["now"] = False
    system_metrics.stop(monitor)
    client = MlflowClient(tracking_uri=mlflow_uri)
    history = client.get_metric_history(run_id, f"system/{NODE}/cpu_utilization_percentage")
    assert len(history) == monitor.readings >= 3  # every reading, none twice
    assert sorted(m.step for m in history) == list(range(len(history)))
    assert sum(m.timestamp <= taken_before for m in history) >= 3  # taken during the outage, logged after it
    messages = [r.getMessage() for r in caplog.records]
    assert any("readings wait for the server" in m for m in messages)
    assert any("is back after" in m for m in messages)


def test_dead_server_never_raises(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once rather than retry for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING, logger="pipeline.tracking.system_metrics")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monitor = system_metrics.start("0" * 32, uri, NODE, interval_s=0.1)
    assert monitor is not None
    wait_for(lambda: monitor.readings >= 2)
    system_metrics.stop(monitor, wait_s=1.0)  # returns (a hang here fails the suite's timeout), never raises
    wait_for(lambda: not monitor.alive(), 30.0)  # past stop's wait the sender gives up too
    messages = [r.getMessage() for r in caplog.records]
    assert any("training goes on" in m for m in messages)
    assert any("were not logged to run" in m for m in messages)


def test_start_never_raises_and_stop_takes_none(monkeypatch, caplog):
    monitor = system_metrics.start("nope", "sqlite:////nonexistent/dir/mlflow.db", NODE, 0.1)  # no such store
    system_metrics.stop(monitor, wait_s=2.0)
    system_metrics.stop(None)
    monkeypatch.setattr(system_metrics, "Monitor", lambda *a: 1 / 0)
    assert system_metrics.start("r", "sqlite:///x.db", NODE) is None


def test_only_local_rank_0_with_a_run_starts_one(monkeypatch):
    started = []
    monkeypatch.setattr(system_metrics, "start", lambda *args: started.append(args) or "monitor")
    monkeypatch.setattr(system_metrics, "node_id", lambda: NODE)
    ctx = {"mlflow_run_id": "r1", "tracking_uri": "sqlite:///x.db",
           "system_metrics": {"interval_s": 3.0, "samples_before_logging": 2}}
    assert system_metrics.start_in_worker(ctx, local_rank=1) is None
    assert system_metrics.start_in_worker({"config": {}}, local_rank=0) is None  # a ctx from before this change
    assert system_metrics.start_in_worker({**ctx, "system_metrics": None}, local_rank=0) is None  # turned off
    assert system_metrics.start_in_worker(ctx, local_rank=0) == "monitor"
    assert started == [("r1", "sqlite:///x.db", NODE, 3.0, 2)]


def test_settings_follow_mlflow_variables(monkeypatch):
    for name in ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
                 "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING"):
        monkeypatch.delenv(name, raising=False)
    assert system_metrics.settings() == {"interval_s": 10.0, "samples_before_logging": 1}
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "3")
    assert system_metrics.settings() == {"interval_s": 2.5, "samples_before_logging": 3}
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert system_metrics.settings() is None


def test_node_id_is_hostname_and_ip(monkeypatch):
    assert system_metrics.node_id("10.1.2.3") == f"{socket.gethostname()}_10.1.2.3"
    monkeypatch.setattr(socket, "gethostname", lambda: "pod/with:odd chars")
    assert system_metrics.node_id("10.1.2.3") == "pod-with-odd-chars_10.1.2.3"
    monkeypatch.setitem(sys.modules, "ray", None)  # no Ray here: the hostname alone
    assert system_metrics.node_id() == "pod-with-odd-chars"
