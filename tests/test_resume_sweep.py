"""A sweep's trial survives two failures, each going on from its last checkpoint, in one MLflow run with
every epoch logged once:

1. its Ray Train worker is SIGKILLed: Tune runs the trial again (``tune.max_failures``, README "Resume and
   retries") in the same driver;
2. the sweep's driver is SIGKILLed: ``stkd tune --resume`` continues the trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import mlflow
import pytest

try:
    from tests.ray_nodes import MARKER, VENV_BIN, Cluster, marked
    from tests.test_autoscale import wait_for
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import MARKER, VENV_BIN, Cluster, marked
    from test_autoscale import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EPOCHS = 12  # room for both kills to land mid-run on a fast machine


def test_a_trial_retries_after_a_lost_worker_and_resumes_after_a_lost_driver(digits, tmp_path):
    (tmp_path / "space.yaml").write_text("method: ce\nparameters:\n  optim.lr: {distribution: grid, values: [0.1]}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_dir = tmp_path / "runs"
    # A checkpoint every epoch: an epoch is logged only once its checkpoint is kept, so each attempt's first
    # epoch is one not logged before, and its set-up time (logged at an attempt's first epoch) marks it.
    args = [str(VENV_BIN / "stkd"), "tune", "--recipe", "test_tiny", "--space", str(tmp_path / "space.yaml"),
            "--samples", "1", "--scheduler", "fifo", f"data.path={digits}", f"train.storage_path={runs_dir}",
            "train.workers=1", "train.cpus_per_worker=1", f"optim.epochs={EPOCHS}", "train.checkpoint_every=1",
            "train.max_failures=0", "tune.max_failures=2"]  # the worker's loss fails the trial; Tune retries it
    cluster = Cluster(head_cpus=3, folder=tmp_path)
    env = cluster.client_env(MLFLOW_TRACKING_URI=uri)
    c = mlflow.MlflowClient(tracking_uri=uri)

    def trial_runs():
        exp = c.get_experiment_by_name("stkd-tests")
        return [r for r in c.search_runs([exp.experiment_id]) if "trial_id" in r.data.tags] if exp else []

    def steps(key: str) -> list[int]:
        runs = trial_runs()
        return [m.step for m in c.get_metric_history(runs[0].info.run_id, key)] if runs else []

    try:
        with open(tmp_path / "first.log", "w") as out:
            driver = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: len(steps("test/top1")) >= 3 or driver.poll() is not None, 180,
                 "the trial's third epoch", every=0.2)
        [worker] = marked(f"{MARKER}={cluster.temp}", also="RayTrainWorker")
        os.kill(worker, signal.SIGKILL)
        # The retry, in the same driver, has started and kept a checkpoint of its own.
        wait_for(lambda: len(steps("setup_time_s")) == 2 and len(steps("test/top1")) > steps("setup_time_s")[1] + 1
                 or driver.poll() is not None, 180, "the retried trial's first epochs", every=0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        first = (tmp_path / "first.log").read_text()
        retried_at = steps("setup_time_s")
        assert len(retried_at) == 2 and len(steps("test/top1")) < EPOCHS, first

        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
        (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        cluster.stop()
    assert "sweep tune-space-" in resumed.stdout and "1 trials" in resumed.stdout

    runs = trial_runs()
    assert len(runs) == 1, "the retry and the resume continued the trial's MLflow run, no second run"
    assert runs[0].info.status == "FINISHED"
    assert sorted(steps("test/top1")) == list(range(EPOCHS)), "every epoch logged once"
    # Each attempt began after the one before it had ended, from a checkpoint, never from epoch 0 again.
    starts = steps("setup_time_s")
    assert len(starts) == 3 and starts[0] == 0 and 0 < starts[1] < starts[2] < EPOCHS, starts
    assert starts[:2] == retried_at

    # Tune's record of the trial agrees: its last restore's first epoch follows a checkpoint.
    results = [json.loads(line) for f in runs_dir.glob("tune-space-*/*/result.json") for line in f.open()]
    # Tune counts iterations from 1 again after a restore; the killed driver may not have recorded its last
    # epochs, or any (MLflow, which the kills wait for, can be ahead of Tune's result.json).
    restart = max(i for i, r in enumerate(results) if r["iterations_since_restore"] == 1)
    assert results[restart]["epochs_done"] == starts[2] + 1, [r["epochs_done"] for r in results]
    assert results[-1]["epochs_done"] == EPOCHS
