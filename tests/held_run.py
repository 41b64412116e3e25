"""A Ray Train callback that holds a run at a known point until the test has acted (see HoldAtEpoch)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ray.cloudpickle
from ray.train import UserCallback


class HoldAtEpoch(UserCallback):
    """Holds the run at one epoch's report: says so in a file and waits for the test's word in another. It
    runs in Ray Train's controller, so the run cannot go past that point before the test has acted, however
    fast the machine: each worker's next report waits for this one to be collected."""

    def __init__(self, folder: Path, epoch: int, timeout_s: float = 300) -> None:
        self.reached, self.go = folder / "reached", folder / "go"
        self.epoch, self.timeout_s = epoch, timeout_s

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if int(metrics[0]["epoch"]) != self.epoch or self.reached.exists():
            return
        self.reached.touch()
        deadline = time.monotonic() + self.timeout_s
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait(self, still_running) -> None:
        """Until the run is held; fails if it ends first."""
        deadline = time.monotonic() + 240
        while not self.reached.exists():
            assert still_running() and time.monotonic() < deadline, "the run never reached the held epoch"
            time.sleep(0.1)

    def release(self) -> None:
        self.go.touch()


# The controller's process cannot import the tests' modules: send this one's code with the callback.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
