"""Where a short run's time goes: the demo (teacher + ce, kd, stkd students on digits), phase by phase.

Runs ``pipeline.demo.run_demo`` once, in this process, into a fresh folder and MLflow store, and
splits its wall time into phases, summed over its four runs:

- driver phases timed by ``pipeline.train.run.train`` (``Outcome.phases``): Ray start, dataset open and
  validation split, the teacher's load and evaluation, MLflow run start, ``TorchTrainer.fit``, the
  final metrics, artifacts and model, and what is left of the run (reading the checkpoint, run end);
- inside ``fit``, from the rank-0 worker's per-epoch metrics in MLflow: worker setup (model, teacher,
  data), training (``epoch_time_s``), evaluation (``eval_time_s``) and checkpoint writing
  (``checkpoint_time_s``); the rest of ``fit`` is Ray Train's start-up, reporting and teardown;
- outside the runs: data preparation and the demo's own work.

The figure of merit is the training fraction: the sum of ``epoch_time_s`` over the runs divided by
the demo's wall time.

    python bench/run_overhead.py [--name run_overhead] [--student-epochs N] [--teacher-epochs N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WORKER_METRICS = {"setup_time_s": "worker setup (model, teacher, data)", "epoch_time_s": "training",
                  "eval_time_s": "evaluation (val + test)", "checkpoint_time_s": "checkpoint writing"}
DRIVER_PHASES = {"ray_start": "Ray start", "dataset": "dataset open + validation split",
                 "teacher": "teacher load + evaluation (driver)", "mlflow_start": "MLflow run start",
                 "finish": "final metrics, artifacts, model (MLflow)"}


def metric_sum(client, run_id: str, key: str) -> float:
    return sum(m.value for m in client.get_metric_history(run_id, key))


def breakdown(rows, client, demo_wall: float) -> dict[str, float]:
    """Seconds per phase, summed over the demo's runs; the phases add up to the demo's wall time."""
    out = {label: sum(r.phases.get(key, 0.0) for r in rows) for key, label in DRIVER_PHASES.items()}
    inside = {label: sum(metric_sum(client, r.run_id, key) for r in rows) for key, label in WORKER_METRICS.items()}
    fit = sum(r.phases.get("fit", 0.0) for r in rows)
    out.update(inside)
    out["Ray Train start-up, reports, teardown"] = fit - sum(inside.values())
    known = sum(r.phases.get(k, 0.0) for r in rows for k in (*DRIVER_PHASES, "fit"))
    out["checkpoint read, run end"] = sum(r.phases.get("total", 0.0) for r in rows) - known
    out["outside the runs (prepare, demo)"] = demo_wall - sum(r.phases.get("total", 0.0) for r in rows)
    return out


def format_table(phases: dict[str, float], wall: float) -> str:
    lines = [f"{'phase':<40} {'seconds':>8} {'share':>6}", "-" * 56]
    lines += [f"{name:<40} {seconds:>8.1f} {100 * seconds / wall:>5.1f}%" for name, seconds in phases.items()]
    lines += ["-" * 56, f"{'demo wall time':<40} {wall:>8.1f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="run_overhead", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--student-epochs", type=int, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="run_overhead-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from pipeline import cli

        cli.quiet_console()  # the console `stkd demo` has
        from pipeline import demo, tracking

        start = time.perf_counter()
        rows = demo.run_demo(Path(tmp), workers=2, seed=0, teacher_epochs=args.teacher_epochs,
                             student_epochs=args.student_epochs)
        wall = time.perf_counter() - start
        phases = breakdown(rows, tracking.client(uri), wall)
    training = phases["training"]
    table = format_table(phases, wall)
    print(table)
    print(f"training fraction: {training / wall:.3f} (sum of epoch_time_s {training:.1f} s / wall {wall:.1f} s)")
    common.write_result(args.name, {
        "what": "the demo's wall time split into phases, summed over its runs (one run of the demo)",
        "wall_s": wall, "training_fraction": training / wall, "phases_s": phases,
        "runs": [{"what": r.what, "epochs": r.epochs, "wall_s": r.wall_s, "driver_phases_s": r.phases} for r in rows],
        "table": table,
    })


if __name__ == "__main__":
    main()
