"""Per-epoch MLflow metrics, written from the Ray Train controller once all workers have reported.

Logging here rather than in a worker means an epoch is logged only when its report (and checkpoint,
if any) has been processed: a worker killed mid-epoch never leaves a metric for an epoch the
resumed run will train again. An epoch redone after restoring an older checkpoint is not logged a
second time.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from pipeline import tracking


class EpochLogger(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.logged: set[int] = set()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        rank0 = metrics[0]
        epoch = int(rank0["epoch"])
        if epoch in self.logged:
            return
        self.logged.add(epoch)
        tracking.log_metrics(self.tracking_uri, self.run_id,
                             {k: v for k, v in rank0.items() if k != "epoch"}, step=epoch)
