"""Per-epoch MLflow metrics, written from the Ray Train controller once all workers have reported.

Logging here rather than in a worker means an epoch is logged only when its report (and checkpoint,
if any) has been processed: a worker killed mid-epoch never leaves a metric for an epoch the
resumed run will train again. An epoch redone after restoring an older checkpoint is not logged a
second time.

Tracking never stops training: a callback that raises here becomes a controller error, which Ray
does not retry. While the server is away, each epoch's metrics wait in a queue, with the time they
were measured, and go out at the next report that finds the server back (one quick try per report,
no MLflow retries). An epoch still queued at a checkpoint is named in that checkpoint's
``unlogged_epochs.json``; the driver (or ``stkd log-run`` later) logs it from the checkpoint's history.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from ray.train import UserCallback

from pipeline import tracking

log = logging.getLogger(__name__)

UNLOGGED_FILE = "unlogged_epochs.json"


class EpochLogger(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.logged: set[int] = set()
        self.queued: dict[int, tuple[int, dict[str, float]]] = {}  # epoch -> (timestamp ms, metrics)
        self.away_since: float | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        rank0 = metrics[0]
        epoch = int(rank0["epoch"])
        # Strings (the first epoch's resolved precision, memory format, device) are tags, not metrics.
        tags = {k: v for k, v in rank0.items() if isinstance(v, str)}
        if tags:
            self.set_tags(tags)
        if epoch not in self.logged and epoch not in self.queued:
            values = {k: v for k, v in rank0.items() if k != "epoch" and not isinstance(v, str)}
            self.queued[epoch] = (int(time.time() * 1000), values)
        self.flush()
        if checkpoint is not None and self.queued:
            self.note_unlogged(checkpoint)

    def set_tags(self, tags: dict[str, str]) -> None:
        try:
            with tracking.quick_requests():
                tracking.set_tags(self.tracking_uri, self.run_id, tags)
        except Exception as e:  # a description of the run, not worth holding training for
            log.warning("MLflow %s: could not set tags %s (%s)", self.tracking_uri, sorted(tags), tracking.first_line(e))

    def flush(self) -> None:
        """Send the queued epochs, oldest first; stop at the first failure and keep the rest."""
        try:
            with tracking.quick_requests():
                for epoch in sorted(self.queued):
                    timestamp, values = self.queued[epoch]
                    tracking.log_metrics(self.tracking_uri, self.run_id, values, step=epoch, timestamp_ms=timestamp)
                    del self.queued[epoch]
                    self.logged.add(epoch)
        except Exception as e:  # whatever went wrong, training goes on
            if self.away_since is None:
                self.away_since = time.monotonic()
                log.warning("MLflow %s: could not log epoch metrics (%s); training goes on, the metrics wait for "
                            "the server", self.tracking_uri, tracking.first_line(e))
            return
        if self.away_since is not None:
            log.warning("MLflow %s is back after %.0f s: queued epoch metrics logged", self.tracking_uri,
                        time.monotonic() - self.away_since)
            self.away_since = None

    def note_unlogged(self, checkpoint: Any) -> None:
        """Name the still-queued epochs beside the checkpoint, whose history holds their metrics."""
        try:
            with checkpoint.filesystem.open_output_stream(f"{checkpoint.path}/{UNLOGGED_FILE}") as f:
                f.write(json.dumps({"run_id": self.run_id, "epochs": sorted(self.queued)}).encode())
        except Exception as e:
            log.warning("could not write %s beside checkpoint %s: %s", UNLOGGED_FILE, checkpoint.path, e)
