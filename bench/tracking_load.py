"""The tracking path under a sweep's load: N simulated trials at once against a real MLflow server.

Each trial is its own process and uses the project's own tracking code, as a trial of `stkd tune` does:
``tracking.tracked_run`` (run start with params, run end), the Ray Train callback that logs epochs
(``EpochLogger.after_report``, with its queue for a server that does not answer), then a small artifact
and final metrics. No training: every ``period_s`` an epoch of ``metrics`` synthetic values is reported.
The trials start together (a barrier after their imports). Measured per backend and N:

- every metric point read back through MLflow's client: lost (a step missing) or doubled (a step twice);
- the delay from an epoch's end to the return of the call that stored it (median, p99);
- the most epochs queued in any trial at once, the epoch logger's storing calls, and errors by kind
  (calls to the server that raised; "slow" for a timeout or a busy answer);
- how late the trials' epochs ran against their schedule (the client side keeping up, or not);
- the CPU seconds of the server's processes (MLflow's, and PostgreSQL's) over the load.

    python bench/tracking_load.py [--trials 4 16 64] [--epochs 20] [--period 1.0] [--backends sqlite postgresql]
                                  [--result-name tracking_load]

Servers are started with cluster/local/mlflow_server.sh in a fresh state folder each, and stopped by
cluster/local/stop.sh. Results: bench/results/tracking_load.json.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common

LOCAL = common.ROOT / "cluster" / "local"
EXPERIMENT = "tracking-load"


def simulated_trial(uri: str, index: int, epochs: int, period_s: float, metrics: int, barrier, out) -> None:
    """One trial (see :func:`run_trial`); a trial that raises puts its error in place of its row."""
    try:
        run_trial(uri, index, epochs, period_s, metrics, barrier, out)
    except BaseException as e:
        out.put({"crashed": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})
        raise


def run_trial(uri: str, index: int, epochs: int, period_s: float, metrics: int, barrier, out) -> None:
    """One trial: a run, ``epochs`` epoch reports through the epoch logger, an artifact, final metrics."""
    import mlflow

    from pipeline import tracking
    from pipeline.tracking import epoch_logger

    errors: Counter = Counter()
    log_epochs = tracking.log_epochs

    def counted(*args, **kwargs):
        try:
            return log_epochs(*args, **kwargs)
        except Exception as e:
            errors["slow" if tracking.is_slow(e) else type(e).__name__] += 1
            raise

    epoch_logger.tracking.log_epochs = counted  # the logger's own calls, counted (this process only)
    for name in ("ray", "torch"):  # a trial's process has both; the run start's version tags import them
        importlib.import_module(name)
    barrier.wait()
    ended, stored, late, peak = {}, {}, [], 0
    with tracking.tracked_run(uri, EXPERIMENT, f"trial-{index}", {"trial": index, "epochs": epochs}) as run_id:
        logger = epoch_logger.EpochLogger(uri, run_id)
        start = time.time()  # the epochs' schedule starts with the run
        for epoch in range(epochs):
            due = start + (epoch + 1) * period_s
            time.sleep(max(0.0, due - time.time()))
            ended[epoch] = time.time()
            late.append(ended[epoch] - due)
            before = set(logger.logged)
            logger.after_report(None, [{"epoch": epoch, **{f"load/m{k:02d}": index + epoch + k / 100
                                                           for k in range(metrics)}}], None)
            now = time.time()
            for e in logger.logged - before:
                stored[e] = now - ended[e]
            peak = max(peak, len(logger.queued))
        while logger.queued and time.time() < start + epochs * period_s + 600:  # what waited goes out
            time.sleep(1.0)
            before = set(logger.logged)
            logger.flush()
            now = time.time()
            for e in logger.logged - before:
                stored[e] = now - ended[e]
        mlflow.log_text("x" * 4096, "model/weights.txt")  # a small artifact, into the active run
        tracking.log_metrics(uri, run_id, {"final/test_top1": 50.0 + index}, step=epochs)
    out.put({"run_id": run_id, "delays_s": list(stored.values()), "unstored": sorted(set(ended) - set(stored)),
             "peak_queue": peak, "errors": dict(errors), "late_s": late, "calls": logger.calls})


def server_cpu_s(state: Path) -> float:
    """CPU seconds used so far by the processes the scripts started for ``state`` (MLflow, PostgreSQL)."""
    tags = [f"{marker}={state}".encode() for marker in ("STKD_LOCAL_MLFLOW", "STKD_LOCAL_POSTGRES")]
    ticks = 0
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            if any(tag in environ for tag in tags):
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def points(uri: str, run_ids: list[str], epochs: int, metrics: int) -> dict[str, int]:
    """Every run's metric histories read back: points expected, lost and doubled, and runs not FINISHED."""
    from pipeline import tracking

    c = tracking.client(uri)
    lost = doubled = unfinished = 0
    for run_id in run_ids:
        unfinished += c.get_run(run_id).info.status != "FINISHED"
        for k in range(metrics):
            steps = Counter(m.step for m in c.get_metric_history(run_id, f"load/m{k:02d}"))
            lost += sum(1 for step in range(epochs) if step not in steps)
            doubled += sum(n - 1 for n in steps.values() if n > 1)
    return {"expected": len(run_ids) * epochs * metrics, "lost": lost, "doubled": doubled, "unfinished_runs": unfinished}


def load(uri: str, trials: int, epochs: int, period_s: float, metrics: int, state: Path | None = None) -> dict[str, Any]:
    """``trials`` simulated trials at once against ``uri``; what the module's docstring lists."""
    from pipeline import tracking

    # As a sweep's parent run does before its trials start: the store and the experiment exist already.
    tracking.experiment_id(tracking.client(uri), EXPERIMENT)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(trials + 1), ctx.Queue()
    procs = [ctx.Process(target=simulated_trial, args=(uri, i, epochs, period_s, metrics, barrier, out))
             for i in range(trials)]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)  # every trial has imported what it needs
    cpu_before, wall_before = (server_cpu_s(state) if state else 0.0), time.time()
    rows = [out.get(timeout=epochs * period_s + 900) for _ in procs]
    cpu, wall = (server_cpu_s(state) if state else 0.0) - cpu_before, time.time() - wall_before
    for p in procs:
        p.join(timeout=60)
    crashed = Counter(r["crashed"] for r in rows if "crashed" in r)
    rows = [r for r in rows if "crashed" not in r]
    delays = sorted(d for r in rows for d in r["delays_s"])
    late = sorted(x for r in rows for x in r["late_s"])
    return {
        "trials": trials, "epochs": epochs, "period_s": period_s, "metrics_per_epoch": metrics,
        "crashed_trials": dict(crashed),
        **points(uri, [r["run_id"] for r in rows], epochs, metrics),
        "never_stored_epochs": sum(len(r["unstored"]) for r in rows),
        "delay_median_s": statistics.median(delays) if delays else None,
        "delay_p99_s": delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else None,
        "peak_queue_epochs": max(r["peak_queue"] for r in rows),
        "storing_calls": sum(r["calls"] for r in rows),
        "errors": dict(sum((Counter(r["errors"]) for r in rows), Counter())),
        "epoch_lateness_p99_s": late[min(len(late) - 1, int(0.99 * len(late)))],
        "server_cpu_s": cpu, "wall_s": wall, "server_cpu_fraction": cpu / wall if wall else None,
    }


class Server:
    """cluster/local/mlflow_server.sh on free ports in a fresh state folder, and its stop.sh."""

    def __init__(self, backend: str, workers: int = 2) -> None:
        sys.path.insert(0, str(common.ROOT / "tests"))
        from ray_nodes import port_block  # the tests' allocator: a block of free ports below Ray's range

        parent = Path(tempfile.mkdtemp(prefix=f"stkd-load-{backend}-", dir="/tmp"))
        parent.chmod(0o711)  # PostgreSQL's own user passes through when this runs as root
        self.parent, self.state, self.backend, self.workers = parent, parent / "state", backend, workers
        self.port = port_block(span=2)
        self.uri = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        args = [str(LOCAL / "mlflow_server.sh"), "--state", str(self.state), "--port", str(self.port),
                "--workers", str(self.workers), "--backend", self.backend, "--pg-port", str(self.port + 1)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"mlflow_server.sh: {done.stderr[-2000:]}")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([str(LOCAL / "stop.sh"), "--mlflow-only", "--state", str(self.state)], capture_output=True,
                       timeout=120)
        shutil.rmtree(self.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--period", type=float, default=1.0, help="seconds between a trial's epochs")
    parser.add_argument("--metrics", type=int, default=12, help="metrics per epoch")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--result-name", default="tracking_load", help="bench/results/<name>.json")
    args = parser.parse_args()
    results = []
    for backend in args.backends:
        for trials in args.trials:
            with Server(backend) as server:
                row = {"backend": backend, **load(server.uri, trials, args.epochs, args.period, args.metrics,
                                                  server.state)}
            results.append(row)
            print(f"{backend:>10} N={trials:<3} crashed {row['crashed_trials'] or 0}, "
                  f"lost {row['lost']} doubled {row['doubled']} of {row['expected']}, "
                  f"delay median {row['delay_median_s']:.2f} s p99 {row['delay_p99_s']:.2f} s, "
                  f"peak queue {row['peak_queue_epochs']}, errors {row['errors']}, "
                  f"server CPU {row['server_cpu_fraction']:.2f}", flush=True)
    common.write_result(args.result_name, {"results": results, "load_average_at_end": os.getloadavg()})


if __name__ == "__main__":
    main()
