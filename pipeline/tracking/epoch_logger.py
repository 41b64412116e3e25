"""Per-epoch MLflow metrics, written from the Ray Train controller once all workers have reported.

Logging here rather than in a worker means an epoch is logged only when its report (and checkpoint,
if any) has been processed: a worker killed mid-epoch never leaves a metric for an epoch the
resumed run will train again. An epoch redone after restoring an older checkpoint is not logged a
second time.

Tracking never stops training: a callback that raises here becomes a controller error, which Ray
does not retry, and while this callback runs the workers' next report waits (Ray Train's result queue
holds one). Each epoch's metrics wait in a queue, with the time they were measured, until the server
takes them, oldest first, several epochs in one ``log_batch``:

- a server that is away (connection refused) costs nothing to try, so the queue is tried at every report;
- a slow server (no answer within the request's timeout, a "busy" status, or an answer that took more
  than ``SLOW_CALL_S``) is tried less and less often (a backoff from ``FIRST_BACKOFF_S`` doubling to
  ``MAX_BACKOFF_S``), one bounded batch at a time, so a backlog does not hold the controller or flood the
  server; a timed-out batch sent again is stored once (the store drops identical metrics).

An epoch still queued at a checkpoint is named in that checkpoint's ``unlogged_epochs.json``; the driver
(or ``stkd log-run`` later) logs it from the checkpoint's history.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from ray.train import UserCallback

from pipeline import tracking

log = logging.getLogger(__name__)

UNLOGGED_FILE = "unlogged_epochs.json"


class EpochLogger(UserCallback):
    FIRST_BACKOFF_S = 2.0
    MAX_BACKOFF_S = 60.0
    SLOW_CALL_S = 2.0
    # Whole epochs, at most this many metrics, per try while the server is slow: one MLflow request.
    SLOW_BATCH_METRICS = 1000

    def __init__(self, tracking_uri: str, run_id: str, timeout_s: int = tracking.QUICK_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tracking_uri, self.run_id, self.timeout_s, self.clock = tracking_uri, run_id, timeout_s, clock
        self.logged: set[int] = set()
        self.queued: dict[int, tuple[int, dict[str, float]]] = {}  # epoch -> (timestamp ms, metrics)
        self.trouble: str | None = None  # None, "away" or "slow"
        self.trouble_since = 0.0
        self.backoff_s = 0.0
        self.next_try = 0.0  # clock() value before which a slow server is not tried again
        self.calls = 0  # storing calls made, answered or not

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
            with tracking.quick_requests(self.timeout_s):
                tracking.set_tags(self.tracking_uri, self.run_id, tags)
        except Exception as e:  # a description of the run, not worth holding training for
            log.warning("MLflow %s: could not set tags %s (%s)", self.tracking_uri, sorted(tags), tracking.first_line(e))

    def flush(self) -> None:
        """Send the queued epochs, oldest first: all of them, or while the server is slow one bounded batch
        once its backoff has passed; keep what was not taken."""
        if not self.queued or (self.trouble == "slow" and self.clock() < self.next_try):
            return
        epochs = self.next_batch() if self.trouble == "slow" else sorted(self.queued)
        started = self.clock()
        try:
            self.calls += 1
            with tracking.quick_requests(self.timeout_s):
                tracking.log_epochs(self.tracking_uri, self.run_id, {e: self.queued[e] for e in epochs})
        except Exception as e:  # whatever went wrong, training goes on
            self.failed(e)
            return
        for epoch in epochs:
            del self.queued[epoch]
            self.logged.add(epoch)
        took = self.clock() - started
        if took > self.SLOW_CALL_S:
            self.slow(f"storing {len(epochs)} epoch(s) took {took:.1f} s")
        elif self.trouble is not None:
            log.warning("MLflow %s %s after %.0f s: queued epoch metrics logged%s", self.tracking_uri,
                        "keeps up again" if self.trouble == "slow" else "is back", self.clock() - self.trouble_since,
                        f", {len(self.queued)} epoch(s) still queued" if self.queued else "")
            self.trouble, self.backoff_s = None, 0.0

    def next_batch(self) -> list[int]:
        """The oldest queued epochs whose metrics fit one request (at least one epoch)."""
        batch, size = [], 0
        for epoch in sorted(self.queued):
            size += len(self.queued[epoch][1])
            if batch and size > self.SLOW_BATCH_METRICS:
                break
            batch.append(epoch)
        return batch

    def failed(self, error: Exception) -> None:
        if tracking.is_slow(error):
            timed_out = any(tracking.timed_out(e) for e in tracking.causes(error))
            self.slow(f"no answer within {self.timeout_s} s" if timed_out else tracking.first_line(error))
            return
        if self.trouble is None:
            self.trouble, self.trouble_since = "away", self.clock()
            log.warning("MLflow %s: could not log epoch metrics (%s); training goes on, the metrics wait for "
                        "the server", self.tracking_uri, tracking.first_line(error))

    def slow(self, what: str) -> None:
        """The server is there but does not keep up: wait longer before each try, send more at once."""
        self.backoff_s = min(self.MAX_BACKOFF_S, max(self.FIRST_BACKOFF_S, 2 * self.backoff_s))
        self.next_try = self.clock() + self.backoff_s
        if self.trouble != "slow":
            if self.trouble is None:
                self.trouble_since = self.clock()
            self.trouble = "slow"
            log.warning("MLflow %s is slow (%s): training goes on; epoch metrics wait and go out in batches, "
                        "tried again after %.0f s, then less often while it stays slow", self.tracking_uri, what,
                        self.backoff_s)

    def note_unlogged(self, checkpoint: Any) -> None:
        """Name the still-queued epochs beside the checkpoint, whose history holds their metrics."""
        try:
            with checkpoint.filesystem.open_output_stream(f"{checkpoint.path}/{UNLOGGED_FILE}") as f:
                f.write(json.dumps({"run_id": self.run_id, "epochs": sorted(self.queued)}).encode())
        except Exception as e:
            log.warning("could not write %s beside checkpoint %s: %s", UNLOGGED_FILE, checkpoint.path, e)
