"""Hardware use in MLflow: what every node of a run used (CPU, memory, disk, network; GPU utilization, memory and
power where there are GPUs), sampled over the run and logged into the run as MLflow system metrics, named as
MLflow names them: ``system/<node id>/cpu_utilization_percentage``, ``system/<node id>/gpu_0_power_usage_watts``.

One monitor per node and run: in each run, the worker with local rank 0 on a node starts it
(:func:`start_in_worker`). Its readings are the whole machine's (psutil, NVML), so a node with 4 workers logs
them once. Ray Train counts local ranks per node IP, and the node id is ``<hostname>_<node IP>``: readable in the
UI, where MLflow shows each node's metrics as a section of its own (``system/<node id>``, against time), and one
id per set of readings (two Ray nodes started on one host and IP, as ``cluster/local/start.sh`` does, have one
local rank 0 between them, and would report the same machine twice).

The readings are MLflow's own monitors (``mlflow.system_metrics``: CPU, disk and network through psutil, NVIDIA
GPUs through nvidia-ml-py, the ``gpu`` extra, AMD ones through pyrsmi); without a GPU, or without nvidia-ml-py,
the GPU metrics are simply absent. This module runs the loop that MLflow's ``SystemMetricsMonitor.start()`` would,
because in MLflow 3.17.2 that loop ends for good at the first failed call to the tracking server (it reads the
run's status after every sample), and its ``finish()`` waits without a limit for the thread and then for the last
upload, with MLflow's HTTP retries (minutes) when the server is away.

Tracking never stops training. Nothing here raises into the caller. The readings are taken by one thread and
sent by another: while the server is away they wait (with the time they were taken) and go out when it is back;
:func:`stop` waits a few seconds for the last of them, then says what was not logged and returns.

Settings (read on the driver, :func:`settings`, and passed to the workers): MLflow's own variables
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default 10), ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``
(readings averaged into one logged point, default 1); ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from typing import Any

from pipeline import tracking

log = logging.getLogger(__name__)

PREFIX = "system/"
DEFAULT_INTERVAL_S = 10.0
STOP_WAIT_S = 5.0  # how long stop() waits for the last readings to reach the server
MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
MAX_WAITING = 50_000  # readings kept while the server is away (a point per metric: about 18 h at 8 metrics / 10 s)


def settings() -> dict[str, Any] | None:
    """The driver's system-metrics settings for the workers, from MLflow's variables; ``None`` when turned off."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0"):
        return None
    try:
        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or DEFAULT_INTERVAL_S)
        samples = int(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING") or 1)
    except ValueError as e:
        log.warning("system metrics: %s; sampling every %.0f s instead", e, DEFAULT_INTERVAL_S)
        interval, samples = DEFAULT_INTERVAL_S, 1
    if interval <= 0:
        return None
    return {"interval_s": interval, "samples_before_logging": max(1, samples)}


def node_id(ip: str | None = None) -> str:
    """``<hostname>_<node IP>`` (Ray's address of this node), usable in a metric name."""
    if ip is None:
        try:
            import ray.util

            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = None
    name = socket.gethostname() + (f"_{ip}" if ip else "")
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def start_in_worker(ctx: dict[str, Any], local_rank: int) -> Monitor | None:
    """In a Ray Train worker: start this node's monitor if this worker is its local rank 0 and the driver
    passed the run (``ctx["mlflow_run_id"]``, ``ctx["tracking_uri"]``, ``ctx["system_metrics"]``)."""
    try:
        options = ctx.get("system_metrics")
        if local_rank != 0 or not ctx.get("mlflow_run_id") or not options:
            return None
        return start(ctx["mlflow_run_id"], ctx["tracking_uri"], node_id(), options["interval_s"],
                     options.get("samples_before_logging", 1))
    except Exception as e:
        log.warning("system metrics not logged: %s", tracking.first_line(e))
        return None


def start(run_id: str, tracking_uri: str, node: str, interval_s: float = DEFAULT_INTERVAL_S,
          samples_before_logging: int = 1) -> Monitor | None:
    """Sample this machine every ``interval_s`` seconds into run ``run_id`` as ``system/<node>/...``, until
    :func:`stop`. Returns the monitor, or ``None`` (with a warning) if it could not start."""
    try:
        monitor = Monitor(run_id, tracking_uri, node, interval_s, samples_before_logging)
        monitor.start()
        return monitor
    except Exception as e:
        log.warning("system metrics of node %s not logged: %s", node, tracking.first_line(e))
        return None


def stop(monitor: Monitor | None, wait_s: float = STOP_WAIT_S) -> None:
    """Take a last reading, wait up to ``wait_s`` for what is still unsent, and stop. Never raises."""
    if monitor is None:
        return
    try:
        monitor.stop(wait_s)
    except Exception as e:
        log.warning("system metrics of node %s: stopping failed: %s", monitor.node, tracking.first_line(e))


class Monitor:
    """One node's readings for one run: a sampling thread and a sending thread (both daemons)."""

    def __init__(self, run_id: str, tracking_uri: str, node: str, interval_s: float, samples_before_logging: int):
        self.run_id, self.tracking_uri, self.node = run_id, tracking_uri, node
        self.interval_s, self.samples_before_logging = float(interval_s), max(1, int(samples_before_logging))
        self.prefix = f"{PREFIX}{node}/"
        self.logged_points = 0  # logged points (one per metric and reading)
        self._stopping = threading.Event()
        self._give_up_at: float | None = None  # time.monotonic() after which the sender stops trying
        self._lock = threading.Condition()
        self._waiting: list[tuple[int, int, dict[str, float]]] = []  # (timestamp ms, reading index, metrics)
        self._readings = 0
        self._dropped = 0
        self._sampling_done = False
        self._sampler = threading.Thread(target=self._sample_loop, name=f"system-metrics-sampler-{node}", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"system-metrics-sender-{node}", daemon=True)

    def start(self) -> None:
        self._sampler.start()
        self._sender.start()

    @property
    def readings(self) -> int:
        """Readings taken so far (each a point per metric)."""
        return self._readings

    def alive(self) -> bool:
        return self._sampler.is_alive() or self._sender.is_alive()

    def stop(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        self._stopping.set()
        self._sampler.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._give_up_at = deadline
            self._lock.notify_all()
        self._sender.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            waiting = list(self._waiting)
        if waiting:
            start, end = (time.strftime("%H:%M:%S", time.localtime(w[0] / 1000)) for w in (waiting[0], waiting[-1]))
            log.warning("MLflow %s: the system metrics of node %s from %s to %s (%d readings) were not logged to "
                        "run %s", self.tracking_uri, self.node, start, end, len(waiting), self.run_id)

    # -- sampling ---------------------------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        try:
            import psutil
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Built here, not in the training thread: its constructor opens an MLflow client (a SQLite store
            # connects). Only its monitors are used (collect_metrics / aggregate_metrics), never its thread.
            readings = SystemMetricsMonitor(self.run_id, sampling_interval=self.interval_s,
                                            samples_before_logging=self.samples_before_logging,
                                            tracking_uri=self.tracking_uri)
            psutil.cpu_percent()  # psutil's CPU use is since the previous call: the first reading covers the wait
        except Exception as e:
            log.warning("system metrics of node %s not logged: %s", self.node, tracking.first_line(e))
            self._end_sampling()
            return
        last = time.monotonic()  # the previous reading (or the priming call)
        samples, taken, failed = 0, 0, False
        while True:
            stopping = self._stopping.wait(self.interval_s)
            # At the end, one more reading (a run shorter than the interval gets one), unless the previous
            # one is too recent to say much.
            if not stopping or not taken or time.monotonic() - last >= min(1.0, self.interval_s):
                try:
                    readings.collect_metrics()
                    samples, taken = samples + 1, taken + 1
                    last = time.monotonic()
                except Exception as e:  # a GPU gone, a psutil error: the next reading may work
                    if not failed:
                        log.warning("system metrics of node %s: reading failed: %s", self.node, tracking.first_line(e))
                    failed = True
            if samples and (samples >= self.samples_before_logging or stopping):
                self._add(readings.aggregate_metrics())
                for monitor in readings.monitors:
                    monitor.clear_metrics()
                samples = 0
            if stopping:
                break
        self._end_sampling()

    def _add(self, metrics: dict[str, float]) -> None:
        with self._lock:
            self._waiting.append((int(time.time() * 1000), self._readings, metrics))
            self._readings += 1
            if len(self._waiting) * max(1, len(metrics)) > MAX_WAITING:
                self._waiting.pop(0)
                self._dropped += 1
                if self._dropped == 1:
                    log.warning("MLflow %s away: dropping the oldest system metrics of node %s", self.tracking_uri,
                                self.node)
            self._lock.notify_all()

    def _end_sampling(self) -> None:
        with self._lock:
            self._sampling_done = True
            self._lock.notify_all()

    # -- sending ----------------------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        client, first_step, away_since, refused = None, None, None, False
        while True:
            with self._lock:
                while not self._waiting and not self._sampling_done:
                    self._lock.wait()
                if not self._waiting:
                    return  # sampling over, everything sent
                if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                    return  # stop() has reported what is left
                batch = list(self._waiting)
            try:
                if client is None:
                    from mlflow import MlflowClient

                    client = MlflowClient(tracking_uri=self.tracking_uri)
                if first_step is None:  # a resumed run, or a restarted worker group: go on from its last step
                    history = client.get_metric_history(self.run_id, f"{self.prefix}cpu_utilization_percentage")
                    first_step = max((m.step for m in history), default=-1) + 1
                self._send(client, batch, first_step)
                if away_since is not None:
                    log.warning("MLflow %s is back after %.0f s: system metrics of node %s logged", self.tracking_uri,
                                time.monotonic() - away_since, self.node)
                    away_since = None
            except Exception as e:  # whatever went wrong, training goes on
                if not tracking.is_outage(e):  # refused (a deleted run, a bad value): sending again will not help
                    if not refused:
                        log.warning("MLflow %s refused the system metrics of node %s for run %s (%s); dropped",
                                    self.tracking_uri, self.node, self.run_id, tracking.first_line(e))
                    refused = True
                    with self._lock:
                        while self._waiting and self._waiting[0][1] <= batch[-1][1]:
                            self._waiting.pop(0)
                    continue
                if away_since is None:
                    away_since = time.monotonic()
                    log.warning("MLflow %s: could not log the system metrics of node %s (%s); training goes on, the "
                                "readings wait for the server", self.tracking_uri, self.node, tracking.first_line(e))
                with self._lock:
                    if self._give_up_at is None:
                        self._lock.wait(tracking.RETRY_EVERY_S)
                    else:
                        self._lock.wait(max(0.0, min(tracking.RETRY_EVERY_S, self._give_up_at - time.monotonic())))

    def _send(self, client, batch: list[tuple[int, int, dict[str, float]]], first_step: int) -> None:
        """Log ``batch`` (the oldest waiting readings) in calls of up to 1000 metrics, taking the readings off the
        queue as they are logged. A reading sent twice (its call failed after the store had it) is stored once:
        same key, step, value and timestamp."""
        from mlflow.entities import Metric

        chunks: list[list[tuple[int, int, dict[str, float]]]] = [[]]
        for reading in batch:
            if chunks[-1] and sum(len(r[2]) for r in chunks[-1]) + len(reading[2]) > MAX_BATCH:
                chunks.append([])
            chunks[-1].append(reading)
        for chunk in chunks:
            points = [Metric(self.prefix + k, float(v), timestamp, first_step + index)
                      for timestamp, index, metrics in chunk for k, v in metrics.items()]
            client.log_batch(self.run_id, metrics=points)
            with self._lock:
                while self._waiting and self._waiting[0][1] <= chunk[-1][1]:
                    self._waiting.pop(0)
                self.logged_points += len(points)
