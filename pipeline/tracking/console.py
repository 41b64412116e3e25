"""One aligned line per epoch on the driver's console while Ray Train runs the workers.

The Ray Train controller (an actor) sees each epoch's report; ``EpochBoard`` carries the rank-0
metrics from there to a thread on the driver, which prints them. Only a driver shows progress: a run
inside a Tune trial (an actor) leaves the console to the sweep's own progress.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from ray.train import UserCallback

POLL_S = 0.5


class _Board:
    """Holds each run's epoch reports until the driver takes them."""

    def __init__(self) -> None:
        self.reports: dict[str, list[dict[str, float]]] = {}

    def put(self, key: str, metrics: dict[str, float]) -> None:
        self.reports.setdefault(key, []).append(metrics)

    def take(self, key: str) -> list[dict[str, float]]:
        return self.reports.pop(key, [])


_board: tuple[str, Any] | None = None  # (Ray job id, actor handle): one board per driver and Ray session


def board():
    """This driver's board actor (no CPU), created once per Ray session."""
    global _board
    import ray

    job = ray.get_runtime_context().get_job_id()
    if _board is None or _board[0] != job:
        _board = (job, ray.remote(num_cpus=0)(_Board).remote())
    return _board[1]


class EpochBoard(UserCallback):
    """Puts rank 0's metrics of every report on the board (before ``fit`` can return, so the driver
    sees the last epoch). A board that does not answer costs the line, never the training."""

    def __init__(self, board_handle: Any, key: str) -> None:
        self.board, self.key = board_handle, key

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.get(self.board.put.remote(self.key, metrics[0]), timeout=10)


def on_driver() -> bool:
    import ray

    return ray.get_runtime_context().get_actor_id() is None


def format_line(metrics: dict[str, float], epochs: int, seconds_left: float | None) -> str:
    """``epoch  3/30  loss 0.512 (ce 0.102 kd 0.410)  train  85.2%  val  90.1  test  89.7  1234 img/s  0:42 left``"""
    terms = {k.removeprefix("loss/"): v for k, v in metrics.items() if k.startswith("loss/") and k != "loss/total"}
    loss = f"loss {metrics['loss/total']:.3f}"
    if len(terms) > 1:
        loss += " (" + " ".join(f"{k} {v:.3f}" for k, v in terms.items()) + ")"
    width = len(str(epochs))
    parts = [f"epoch {int(metrics['epoch']) + 1:>{width}}/{epochs}", loss, f"train {metrics['train/acc']:5.1f}%"]
    for split in ("val", "test"):
        value = metrics.get(f"{split}/top1")
        if value is not None:
            parts.append(f"{split} {value:5.1f}%")
        elif split == "test":
            parts.append("(not evaluated)")
    parts.append(f"{metrics['images_per_s']:6.0f} img/s")
    if seconds_left is not None:
        parts.append(f"{int(seconds_left) // 60}:{int(seconds_left) % 60:02d} left")
    return "  ".join(parts)


@contextlib.contextmanager
def epoch_lines(key: str, epochs: int, enabled: bool = True, out=print) -> Iterator[list[UserCallback]]:
    """Yields the Ray Train callbacks to add to the trainer; while inside, prints each epoch as it ends."""
    if not enabled or not on_driver():
        yield []
        return
    import ray

    handle = board()
    stop = threading.Event()
    arrivals: list[float] = []

    def show(reports):
        for metrics in reports:
            arrivals.append(time.monotonic())
            left = None
            if len(arrivals) > 1:
                per_epoch = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
                left = per_epoch * (epochs - 1 - int(metrics["epoch"]))
            out(format_line(metrics, epochs, left))

    def poll():
        while not stop.wait(POLL_S):
            show(ray.get(handle.take.remote(key)))

    thread = threading.Thread(target=poll, name=f"progress-{key}", daemon=True)
    thread.start()
    try:
        yield [EpochBoard(handle, key)]
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # the last reports; never hide the run's own error
            show(ray.get(handle.take.remote(key), timeout=5))
