"""Stopping a job cleanly on SIGTERM (``ray job stop``, a scheduler, ``kill``) and SIGINT (Ctrl-C).

The first signal asks the running job to stop at its next safe point: a training run's workers finish
their epoch and checkpoint (``train.stop_grace_s`` bounds the wait), a Tune experiment saves its state.
A second signal, or the grace running out, stops it at once. Either way the job's MLflow runs end KILLED
with the reason and the command that continues them (``tracking.tracked_run``), and the command line
exits 128 + the signal's number (143, 130) with one line. The same command then continues the same run.

Signal handlers belong to the process, so this module keeps the one process-wide record of what was
asked (``signals``); the command line installs it once, before anything else runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from pipeline import storage

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_FILE = "stop_requested"  # in the Ray Train run's folder: the workers look for it after every epoch


class Stopped(BaseException):
    """The job was stopped by a signal. A BaseException, like KeyboardInterrupt: no ``except
    Exception`` on the way out may swallow it."""

    def __init__(self, signum: int, detail: str = "", continue_with: str | None = None) -> None:
        self.signum = signum
        self.detail = detail
        self.continue_with = continue_with  # the command that continues the job (an MLflow tag, the console)
        super().__init__(f"stopped by {self.signal_name}" + (f" {detail}" if detail else ""))

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process its signal ended


class StopSignals:
    """What the process was asked to do. ``requested`` is the first stop signal's number, or None."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.installed = False
        self._on_stop: Callable[[int], None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take SIGTERM and SIGINT (main thread only), forgetting any earlier request."""
        if not in_main_thread():
            return
        self.requested, self._on_stop = None, None
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self._take()
        self.installed = True

    def reinstall(self) -> None:
        """After ``ray.init``, which sets a SIGTERM handler of its own."""
        if self.installed and in_main_thread():
            self._take()

    def uninstall(self) -> None:
        """Give the signals back (the command line called in-process, as tests do)."""
        if self.installed and in_main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self.installed = False

    def _take(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None or self._on_stop is None:
            self.requested = self.requested or signum
            raise Stopped(self.requested)
        self.requested = signum
        log.warning("%s received: stopping at the next safe point (again to stop at once)",
                    signal.Signals(signum).name)
        self._on_stop(signum)

    @contextlib.contextmanager
    def graceful(self, on_stop: Callable[[int], None]) -> Iterator[None]:
        """While the block runs, a first stop signal calls ``on_stop`` (which starts a graceful stop)
        instead of raising :class:`Stopped`."""
        previous, self._on_stop = self._on_stop, on_stop
        try:
            yield
        finally:
            self._on_stop = previous

    def check(self, detail: str = "", continue_with: str | None = None) -> None:
        """Raise :class:`Stopped` if a stop was asked (after a block that stopped gracefully)."""
        if self.requested is not None:
            raise Stopped(self.requested, detail, continue_with)


signals = StopSignals()


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run_stoppable(fit: Callable[[], Any], on_stop: Callable[[int], None], grace_s: float) -> Any:
    """Run ``fit`` so that a first stop signal calls ``on_stop`` and allows ``grace_s`` seconds for
    it to take effect before :class:`Stopped` is raised. Outside the main thread (a Tune trial) it
    just runs ``fit``: signals reach the main thread only.

    ``fit`` runs in a thread of its own because Ray Train's ``fit()`` takes SIGINT for itself when it
    runs in the main thread (ray.train.v2 ``DataParallelTrainer._register_sigint_handler``) and aborts
    the workers without a checkpoint; here the main thread keeps the signals."""
    if not (signals.installed and in_main_thread()):
        return fit()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e

    def stop(signum: int) -> None:
        on_stop(signum)
        if grace_s <= 0:
            raise Stopped(signum)
        signal.signal(signal.SIGALRM, lambda *_: signals.check("(the grace period ran out)"))
        signal.setitimer(signal.ITIMER_REAL, grace_s)

    thread = threading.Thread(target=target, name="stkd-fit", daemon=True)
    with signals.graceful(stop):
        try:
            thread.start()
            while thread.is_alive():
                thread.join(0.2)  # short waits: the main thread runs signal handlers between them
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def continue_command(resume_name: str | None = None, override: str | None = None) -> str:
    """The command line that continues this job: this one, plus ``--resume --name NAME`` for a sweep
    or study (``resume_name``) or ``override`` (``train.run_name=NAME``) for a run, unless it has them."""
    command, *rest = sys.argv[1:] or ["?"]
    added = []
    if resume_name is not None:
        added += [] if "--resume" in rest else ["--resume"]
        added += [] if "--name" in rest else ["--name", resume_name]
    key = override.split("=", 1)[0] + "=" if override else None
    tail = [override] if override and not any(a.startswith(key) for a in rest) else []
    return shlex.join(["stkd", command, *added, *rest, *tail])


def request_stop(stop_file: str) -> None:
    """Ask a Ray Train run's workers to stop after their epoch (the file they look for)."""
    storage.write_text(stop_file, "stop\n")
    log.info("asked the workers to checkpoint after this epoch and stop (%s)", stop_file)


def interrupt_tune() -> bool:
    """Tune's own graceful stop, SIGUSR1: ``Tuner.fit`` saves the experiment and returns, and a
    restore runs its unfinished trials and the trials it had not started yet. (A Stopper's
    ``stop_all`` instead marks the search finished: a restore would start none of the rest.)
    Tune takes SIGUSR1 only when ``fit`` runs in the main thread; elsewhere this does nothing and
    says so by returning False."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGUSR1)):
        return False
    os.kill(os.getpid(), signal.SIGUSR1)
    return True


def tune_stopper(signum: int) -> None:
    """A first stop signal during ``Tuner.fit``: Tune's graceful stop. SIGINT is left to us
    (``TUNE_DISABLE_SIGINT_HANDLER``, set by the command line) so that SIGTERM and Ctrl-C behave alike."""
    interrupt_tune()
