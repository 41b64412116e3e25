"""Ray Train's own fixed cost per run: ``TorchTrainer.fit`` on a train function that does nothing.

What is left of a short run's time once this project's work is taken out (``run_overhead.py``'s
"Ray Train start-up, reports, teardown") is measured here without any of it: no model, no data, no
MLflow. Each ``fit`` is timed from the call to the train function's start (start-up: the controller
actor, the placement group, the worker actors, the train context and the torch process group) and
from there to ``fit``'s return (teardown), with the 1-minute load average before and after each.
Ray Train's controller log splits the start-up further; its lines for the last run are copied into
the results. One Ray instance, started here, as the demo starts it; a first warm-up ``fit`` pays for
Ray's first imports in its worker processes and is not counted.

    python bench/ray_train_fixed_cost.py [--repeats 4] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # what `stkd` sets
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # what `stkd` sets


def note_start(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["marker"]).write_text(repr(time.time()))


def one_fit(workers: int, storage: str, marker: Path) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    load_before = os.getloadavg()[0]
    started = time.time()
    TorchTrainer(note_start, train_loop_config={"marker": str(marker)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=storage, name=f"noop-{workers}-{time.time_ns()}")).fit()
    ended = time.time()
    function_started = float(marker.read_text())
    return {"fit_s": ended - started, "start_up_s": function_started - started, "teardown_s": ended - function_started,
            "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0]}


def controller_lines() -> list[str]:
    """The worker-group start-up lines of the newest Ray Train controller log of this Ray instance."""
    from ray._private import worker

    logs = sorted(Path(worker._global_node.get_logs_dir_path(), "train").glob("ray-train-sys-controller-*.log"),
                  key=lambda p: p.stat().st_mtime)
    lines = []
    for raw in logs[-1].read_text().splitlines() if logs else []:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        message = record.get("message", "")
        if "[Worker Group Initialization]" in message or message.startswith("Requesting resources"):
            lines.append(f"{record.get('asctime')} {message.splitlines()[0]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        marker = Path(folder, "started")
        one_fit(1, folder, marker)  # warm-up: the first worker processes import Ray Train and torch
        for workers in args.workers:
            fits = [one_fit(workers, folder, marker) for _ in range(args.repeats)]
            results[f"{workers}_workers"] = {
                "fits": fits, **{f"median_{k}": statistics.median(f[k] for f in fits) for k in fits[0] if k.endswith("_s")}}
            print(f"{workers} worker(s): fit {results[f'{workers}_workers']['median_fit_s']:.1f} s median "
                  f"(start-up {results[f'{workers}_workers']['median_start_up_s']:.1f} s)", flush=True)
        lines = controller_lines()
    load = os.getloadavg()[0]
    ray.shutdown()
    common.write_result("ray_train_fixed_cost", {"repeats": args.repeats, "results": results,
                                                 "controller_log_last_run": lines, "load_average_1m_at_end": load})


if __name__ == "__main__":
    main()
