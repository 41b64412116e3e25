"""Stopping and continuing jobs: SIGTERM (`ray job stop`, schedulers) and SIGINT (Ctrl-C) end a run KILLED,
exit 143/130 with one line, and the same command continues the same MLflow run, every epoch logged once.

The signal mechanics are unit tests in this process; the jobs are real ``stkd`` processes on the session's
Ray, sent real signals when their output says they reached a known epoch.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest

from pipeline import cli, stopping

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stop_signals():
    stopping.signals.install()
    yield stopping.signals
    stopping.signals.uninstall()


def test_stopped_exits_as_a_shell_reports_a_signal():
    assert stopping.Stopped(signal.SIGTERM).exit_code == 143
    assert stopping.Stopped(signal.SIGINT).exit_code == 130
    assert str(stopping.Stopped(signal.SIGTERM, "after epoch 3 of 9")) == "stopped by SIGTERM after epoch 3 of 9"
    assert not isinstance(stopping.Stopped(signal.SIGTERM), Exception), "no `except Exception` may swallow a stop"


def test_the_continue_command_names_what_the_first_one_left_unnamed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stkd", "distill", "--recipe", "my recipe.yaml", "optim.lr=0.1"])
    assert stopping.continue_command(override="train.run_name=kd-x") == \
        "stkd distill --recipe 'my recipe.yaml' optim.lr=0.1 train.run_name=kd-x"
    monkeypatch.setattr(sys, "argv", ["stkd", "distill", "--recipe", "r", "train.run_name=mine"])
    assert stopping.continue_command(override="train.run_name=mine") == "stkd distill --recipe r train.run_name=mine"
    monkeypatch.setattr(sys, "argv", ["stkd", "study", "--spec", "demo"])
    assert stopping.continue_command(resume_name="study-demo-1") == \
        "stkd study --resume --name study-demo-1 --spec demo"
    monkeypatch.setattr(sys, "argv", ["stkd", "tune", "--resume", "--name", "t1", "--recipe", "r"])
    assert stopping.continue_command(resume_name="t1") == "stkd tune --resume --name t1 --recipe r"


def test_a_first_signal_asks_for_a_graceful_stop_and_a_second_stops_at_once(stop_signals):
    asked = []
    with stop_signals.graceful(asked.append):
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked == [signal.SIGTERM] and stop_signals.requested == signal.SIGTERM
        with pytest.raises(stopping.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.signum == signal.SIGTERM, "the first signal names the stop"


def test_without_a_graceful_block_the_first_signal_stops_at_once(stop_signals):
    with pytest.raises(stopping.Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.exit_code == 130


def test_uninstall_gives_the_signals_back():
    before = signal.getsignal(signal.SIGINT)
    stopping.signals.install()
    assert signal.getsignal(signal.SIGINT) != before
    stopping.signals.uninstall()
    assert signal.getsignal(signal.SIGINT) == before


def test_run_stoppable_lets_the_job_stop_itself_within_the_grace(stop_signals):
    done = threading.Event()

    def fit():
        assert done.wait(30), "on_stop never came"
        return "stopped at an epoch's end"

    def on_stop(signum):
        done.set()

    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert stopping.run_stoppable(fit, on_stop, grace_s=30) == "stopped at an epoch's end"
    assert stop_signals.requested == signal.SIGTERM


def test_run_stoppable_stops_at_once_when_the_grace_runs_out(stop_signals):
    never = threading.Event()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        with pytest.raises(stopping.Stopped, match="grace period ran out"):
            stopping.run_stoppable(lambda: never.wait(30), lambda signum: None, grace_s=0.5)
    finally:
        never.set()


def test_run_stoppable_passes_the_jobs_error_on(stop_signals):
    def fit():
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        stopping.run_stoppable(fit, lambda signum: None, grace_s=1)


# Real jobs.

def stkd_job(argv: list[str], ray_session, log: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=log.parent, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop_at_epoch(job: subprocess.Popen, log: Path, epoch: int, epochs: int, signum: int) -> str:
    """Send ``signum`` once the driver has printed epoch ``epoch``; the job's whole output."""
    from test_outage import wait_for_text

    wait_for_text(job, log, rf"epoch +{epoch}/{epochs} ", timeout=300)
    job.send_signal(signum)
    job.wait(timeout=300)
    return log.read_text()


def driver_lines(output: str) -> str:
    """The driver's own output, without the lines Ray forwards from its actors (``(Name pid=N)``)."""
    return "\n".join(line for line in output.splitlines() if not re.search(r"\(\w+ pid=\d+", line))


def continued(output: str) -> list[str]:
    """The arguments of the command the stop line says continues the job."""
    line = re.search(r"continue with: (.+)", output).group(1)
    argv = shlex.split(line)
    assert argv[0] == "stkd"
    return argv[1:]


@pytest.mark.slow
def test_a_stopped_run_ends_killed_and_the_same_command_continues_the_same_run(ray_session, tiny_overrides, tmp_path):
    epochs = 30  # far more than the epochs a worker runs ahead of the driver's printed line before a stop
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["distill", "--recipe", "test_tiny", *tiny_overrides, f"train.storage_path={tmp_path / 'runs'}",
            f"optim.epochs={epochs}", "train.workers=1", "train.cpus_per_worker=1", "train.checkpoint_every=100",
            "data.val_fraction=0.1", "train.stop_grace_s=120"]
    c = mlflow.MlflowClient(uri)

    # SIGTERM after epoch 3: the workers finish the epoch they are in, checkpoint it, and stop.
    first = stop_at_epoch(stkd_job(argv, ray_session, tmp_path / "first.log", uri), tmp_path / "first.log", 3,
                          epochs, signal.SIGTERM)
    stop_line = re.search(rf"stkd distill: stopped by SIGTERM after epoch (\d+) of {epochs} \(checkpoint .+\); continue with", first)
    assert stop_line, first[-3000:]
    assert "SIGTERM received at time" not in first, "Ray's native stack dump"
    assert "Traceback" not in driver_lines(first), first[-3000:]
    stopped_after = int(stop_line.group(1))
    [run] = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id])
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["end_reason"].startswith(f"stopped by SIGTERM after epoch {stopped_after} of {epochs}")
    again = continued(first)
    assert run.data.tags["continue_with"] == shlex.join(["stkd", *again])
    assert again[-1].startswith("train.run_name=") and again[:-1] == argv

    # The printed command continues it; Ctrl-C after a later epoch stops it again (exit 130).
    second_log = tmp_path / "second.log"
    second = stop_at_epoch(stkd_job(again, ray_session, second_log, uri), second_log, stopped_after + 2, epochs,
                           signal.SIGINT)
    assert re.search(rf"stkd distill: stopped by SIGINT after epoch \d+ of {epochs}", second), second[-3000:]
    assert f"epoch {stopped_after:2d}/{epochs}" not in second, "a checkpointed epoch was trained again"
    assert c.get_run(run.info.run_id).info.status == "KILLED"

    # The third attempt with `stkd -v` (README: Ray Train's own INFO lines on the console too).
    shell = {k: v for k, v in os.environ.items() if k not in cli.QUIET_ENV}  # as a user's shell has it
    third = subprocess.run([sys.executable, "-m", "pipeline", "-v", *again], cwd=tmp_path, capture_output=True,
                           text=True, env={**shell, "MLFLOW_TRACKING_URI": uri,
                                           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert "Reporting training result" in third.stdout + third.stderr, "stkd -v shows Ray Train's INFO lines"
    assert "Reporting training result" not in first + second, "without -v they stay in Ray's log files"
    runs = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id], "one MLflow run across the three attempts"
    finished = runs[0]
    assert finished.info.status == "FINISHED"
    assert not {"end_reason", "continue_with"} & set(finished.data.tags), "the stops' tags went with them"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(steps) == list(range(epochs)), steps
    val = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val/top1")}
    best = max(val.values())
    assert finished.data.metrics["final/selected_epoch"] == min(e for e, v in val.items() if v == best), \
        "the selected epoch is chosen over the whole history, all three attempts"

    # The same command once more: the run has finished, nothing starts.
    fourth = subprocess.run([sys.executable, "-m", "pipeline", *again], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert fourth.returncode == 2 and "already finished" in fourth.stderr, fourth.stderr[-2000:]


def children_of(c: mlflow.MlflowClient, experiment: str) -> tuple[list, list]:
    """(parent runs, their child runs) of an experiment."""
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tune", "study"])
def test_a_stopped_sweep_or_study_ends_killed_and_resumes_its_parent(command, ray_session, tiny_overrides, tmp_path):
    from test_autoscale import wait_for

    epochs = 6
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*tiny_overrides, f"train.storage_path={tmp_path / 'runs'}", f"optim.epochs={epochs}",
              "train.workers=1", "train.cpus_per_worker=1"]
    if command == "tune":
        argv = ["tune", "--recipe", "test_tiny", "--space", "ce", "--samples", "2", "--scheduler", "fifo", *common]
    else:
        spec = tmp_path / "spec.yaml"
        # A tuned study, stopped in its tuning stage: the stage whose space Tune saves only as placeholders.
        spec.write_text("description: stopped study\npairs: [test_tiny]\nmethods:\n  ce: {name: ce}\n"
                        "seeds: [0]\ntune: {samples: 2, scheduler: fifo}\n")
        argv = ["study", "--spec", str(spec), *common]
    c = mlflow.MlflowClient(uri)
    log = tmp_path / "first.log"
    job = stkd_job(argv, ray_session, log, uri)

    def a_trial_logged_two_epochs() -> bool:
        assert job.poll() is None, log.read_text()[-3000:]
        return any(len(c.get_metric_history(r.info.run_id, "loss/total")) >= 2
                   for r in children_of(c, "stkd-tests")[1])

    wait_for(a_trial_logged_two_epochs, 300, "a trial's second epoch")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == 143, log.read_text()[-3000:]
    first = log.read_text()
    assert re.search(rf"stkd {command}: stopped by SIGTERM; continue with: stkd {command} --resume --name ", first), \
        first[-3000:]
    assert "SIGTERM received at time" not in first and "Traceback" not in driver_lines(first), first[-3000:]
    [parent], trials = children_of(c, "stkd-tests")
    assert parent.info.status == "KILLED" and parent.data.tags["continue_with"].startswith(f"stkd {command} --resume")
    assert all(t.info.status != "RUNNING" for t in trials), "no trial run left RUNNING"

    again = subprocess.run([sys.executable, "-m", "pipeline", *continued(first)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=900, env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                                        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    [resumed], trials = children_of(c, "stkd-tests")
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert len(trials) == (2 if command == "tune" else 3) and all(t.info.status == "FINISHED" for t in trials), \
        [(t.info.run_name, t.info.status) for t in trials]
    for t in trials:
        steps = sorted(m.step for m in c.get_metric_history(t.info.run_id, "loss/total"))
        assert steps == list(range(epochs)), (t.info.run_name, steps)
        assert not [k for k, v in t.data.params.items() if "__fn_ph" in v], (t.info.run_name, t.data.params)
    if command == "study":
        tuned = [t for t in trials if t.data.tags["stage"] == "tune"]
        [seeded] = [t for t in trials if t.data.tags["stage"] == "seeds"]
        assert len(tuned) == 2 and len({t.data.params["optim.lr"] for t in tuned}) == 2, "each trial its own sample"
        best_val = max(t.data.metrics["final/val_top1_selected"] for t in tuned)
        winners = {t.data.params["optim.lr"] for t in tuned if t.data.metrics["final/val_top1_selected"] == best_val}
        assert seeded.data.params["optim.lr"] in winners, "the seed run carries the winner"
