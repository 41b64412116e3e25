"""What a sweep or study shows while it runs: a summary line, a table of its trials, and what waiting
trials wait for; and the resource timeout that ends a sweep whose cluster never grows to fit a trial.

Tune's own console output stays off (``verbose=0``): it prints every trial's whole configuration and
all of its metrics. This prints the searched parameters and the few numbers a person compares.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import tune

from pipeline import config as config_lib, stopping

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 15
TABLE_EVERY_S = 60
TABLE_ROWS = 20  # the rest is summed up in one line; trials.csv has them all
STATUS_ORDER = ("running", "starting", "pending", "paused", "done", "stopped", "error")


def pending_placement_groups() -> list[dict[str, float]]:
    """The resources of each placement group in the cluster still waiting to be placed."""
    from ray.util import placement_group_table

    pending = []
    for group in placement_group_table().values():
        if group["state"] in ("PENDING", "RESCHEDULING"):
            total: dict[str, float] = {}
            for bundle in group["bundles"].values():
                for key, value in bundle.items():
                    total[key] = total.get(key, 0.0) + value
            pending.append(total)
    return pending


def trial_status(trial, epochs: int, reported: set[str]) -> str:
    """A trial's state as a person reads it: ``starting`` runs but has not reported an epoch yet
    (its workers are being placed or set up), ``stopped`` ended before its last epoch (the scheduler
    stopped it early)."""
    if trial.status == "RUNNING":
        return "running" if trial.trial_id in reported else "starting"
    if trial.status == "TERMINATED":
        return "stopped" if (trial.last_result or {}).get("epochs_done", 0) < epochs else "done"
    return {"PENDING": "pending", "PAUSED": "paused", "ERROR": "error"}.get(trial.status, trial.status.lower())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v) for v in value)
    return "-" if value is None else str(value)


def trial_table(trials: list, metric: str, epochs: int, reported: set[str], limit: int = TABLE_ROWS) -> list[str]:
    """One aligned line per trial: its id, status, searched parameters, epochs done, ``metric`` and
    images/s; running trials first, then finished ones best first. At most ``limit`` trials."""
    params = sorted({key for t in trials for key in (t.config or {})})
    rows = []
    for t in trials:
        config, result = t.config or {}, t.last_result or {}
        status = trial_status(t, epochs, reported)
        value = result.get(metric)
        done = result.get("epochs_done")
        rows.append(((STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER),
                      -value if value is not None else float("inf")),
                     [t.trial_id, status, *(_cell(config.get(p)) for p in params),
                      f"{done}/{epochs}" if done is not None else f"-/{epochs}", _cell(value),
                      _cell(round(result["images_per_s"])) if "images_per_s" in result else "-"]))
    rows.sort(key=lambda row: row[0])
    header = ["trial", "status", *params, "epoch", metric, "img/s"]
    shown = [header] + [cells for _, cells in rows[:limit]]
    widths = [max(len(line[i]) for line in shown) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 + len(params) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             .rstrip() for line in shown]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more (the sweep's trials.csv lists every trial when it ends)")
    return lines


class Progress(tune.Callback):
    """A Tune callback logging, every ``SUMMARY_EVERY_S``, the trials running, waiting for resources,
    finished, stopped early and errored and the best so far; every ``TABLE_EVERY_S`` and at the end, the
    trial table. It notes when trials have waited ``timeout_s`` for resources while none progressed,
    and :class:`ResourceStopper` then ends the sweep.

    A trial waits for resources when it runs (its own driver holds a sliver of CPU) but its
    TorchTrainer's workers are not placed yet: Ray Train retries placing them until they fit, while
    the autoscaler adds nodes.
    """

    def __init__(self, metric: str, epochs: int, need: dict[str, float], timeout_s: float,
                 pending=pending_placement_groups, clock=time.monotonic, interrupt=stopping.interrupt_tune):
        self.metric, self.epochs, self.need, self.timeout_s = metric, epochs, need, timeout_s
        self.pending, self.clock, self.interrupt = pending, clock, interrupt
        self.best = None
        self.timed_out: str | None = None
        self.interrupted = False  # the timeout stopped Tune as a stop signal does (resumable)
        self.last_log = self.last_table = self.last_check = 0.0
        self.progressed = None  # when a trial last reported, or nothing was pending
        self.reported: set[str] = set()
        self.waiting: list[dict[str, float]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.progressed = self.clock()
        self.reported.add(trial.trial_id)
        value = result.get(self.metric)
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (value, trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        now = self.clock()
        if self.progressed is None:
            self.progressed = self.last_table = now  # the first table once trials have had time to start
        if now - self.last_check >= 2:
            self.last_check = now
            self.waiting = self.pending()
            if not self.waiting:
                self.progressed = now
            elif now - self.progressed > self.timeout_s and self.timed_out is None:
                self.timed_out = (f"for {self.timeout_s:.0f} s no trial progressed while "
                                  f"{self.describe_wait(trials)}; the cluster did not grow to fit them")
                self.interrupted = self.interrupt()
        if now - self.last_log >= SUMMARY_EVERY_S:
            self.log(trials, table=now - self.last_table >= TABLE_EVERY_S)

    # Not on_trial_complete: Tune calls it before the trial's status says so.
    def on_experiment_end(self, trials, **info):
        self.log(trials, table=True)

    def describe_wait(self, trials) -> str:
        import ray

        waiting = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.reported]
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        return (f"{len(waiting)} trial(s) wait for resources ({self.need} each; "
                f"{len(self.waiting)} placement group(s) pending, e.g. {self.waiting[0]}; free now: {free})")

    def log(self, trials, table: bool = False):
        self.last_log = self.clock()
        statuses = [trial_status(t, self.epochs, self.reported) for t in trials]
        best = f"{self.best[0]:.2f} ({self.best[1]})" if self.best else "-"
        wait = ""
        if self.waiting and "starting" in statuses:
            wait = f"; {self.describe_wait(trials)}"
        log.info("trials: %d running, %d finished, %d stopped early, %d errored, %d pending; best epoch %s %s%s",
                 statuses.count("running") + statuses.count("starting"), statuses.count("done"),
                 statuses.count("stopped"), statuses.count("error"), statuses.count("pending"), self.metric,
                 best, wait)
        if table and trials:
            self.last_table = self.last_log
            log.info("\n%s", "\n".join(trial_table(trials, self.metric, self.epochs, self.reported)))



class ResourceStopper(tune.Stopper):
    """Ends the whole sweep once ``progress`` saw trials wait too long for resources, where Tune's
    graceful stop (:func:`stopping.interrupt_tune`) could not."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.progress.timed_out is not None and not self.progress.interrupted


class ResourceTimeout(config_lib.ConfigError):
    """Trials waited longer than ``tune.resource_timeout_s`` for resources that never came."""


def check_timed_out(progress, what: str, timeout_option: str, continue_with: str) -> None:
    if progress.timed_out:
        raise ResourceTimeout(f"{what}: {progress.timed_out}. Check that the cluster can hold one trial (node types, "
                              f"max_workers, `ray status`), or wait longer ({timeout_option}); then continue it "
                              f"with: {continue_with}")
