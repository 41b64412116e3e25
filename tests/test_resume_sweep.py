"""`stkd tune --resume` after the sweep's driver was SIGKILLed in the middle of a trial: the trial goes on
from its last checkpoint (not from epoch 0), in the same MLflow run, every epoch logged once."""

from __future__ import annotations

import json
import signal
import subprocess

import mlflow
import pytest

try:
    from tests.ray_nodes import VENV_BIN, Cluster
    from tests.test_autoscale import wait_for
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import VENV_BIN, Cluster
    from test_autoscale import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EPOCHS = 12  # room for the kill to land mid-run on a fast machine
CHECKPOINT_EVERY = 2


def test_a_killed_sweep_resumes_its_trial_from_the_checkpoint(digits, tmp_path):
    (tmp_path / "space.yaml").write_text("method: ce\nparameters:\n  optim.lr: {distribution: grid, values: [0.1]}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_dir = tmp_path / "runs"
    args = [str(VENV_BIN / "stkd"), "tune", "--recipe", "test_tiny", "--space", str(tmp_path / "space.yaml"),
            "--samples", "1", "--scheduler", "fifo", f"data.path={digits}", f"train.storage_path={runs_dir}",
            "train.workers=1", "train.cpus_per_worker=1", f"optim.epochs={EPOCHS}",
            f"train.checkpoint_every={CHECKPOINT_EVERY}"]
    cluster = Cluster(head_cpus=3, folder=tmp_path)
    env = cluster.client_env(MLFLOW_TRACKING_URI=uri)
    c = mlflow.MlflowClient(tracking_uri=uri)

    def trial_runs():
        exp = c.get_experiment_by_name("stkd-tests")
        return [r for r in c.search_runs([exp.experiment_id]) if "trial_id" in r.data.tags] if exp else []

    def epochs_logged():
        runs = trial_runs()
        return [m.step for m in c.get_metric_history(runs[0].info.run_id, "test/top1")] if runs else []

    try:
        with open(tmp_path / "first.log", "w") as out:
            driver = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        # Past the first checkpoint (after epoch CHECKPOINT_EVERY) and into the next stretch.
        wait_for(lambda: len(epochs_logged()) > CHECKPOINT_EVERY or driver.poll() is not None, 180,
                 "the trial to pass its first checkpoint", every=0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_after = len(epochs_logged())
        assert killed_after < EPOCHS, (tmp_path / "first.log").read_text()

        resumed = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
        (tmp_path / "resumed.log").write_text(resumed.stdout + resumed.stderr)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        cluster.stop()
    assert "sweep tune-space-" in resumed.stdout and "1 trials" in resumed.stdout

    runs = trial_runs()
    assert len(runs) == 1, "the resumed trial continued its MLflow run, no second run"
    assert runs[0].info.status == "FINISHED"
    assert sorted(epochs_logged()) == list(range(EPOCHS)), "every epoch logged once"

    # Tune's record of the trial: the resumed attempt's first epoch follows a checkpoint, not epoch 0.
    results = [json.loads(line) for f in runs_dir.glob("tune-space-*/*/result.json") for line in f.open()]
    done = [r["epochs_done"] for r in results]
    # Tune counts iterations from 1 again after a restore: the resumed attempt's first row is the last row
    # at 1. (The killed driver may not have recorded its last epochs, or any: MLflow, which the kill waits
    # for, can be ahead of Tune's result.json; so neither the epoch numbers nor a row before the restart
    # need exist.)
    restart = max(i for i, r in enumerate(results) if r["iterations_since_restore"] == 1)
    assert done[restart] > 1, f"the trial started again from epoch 1: {done}"
    # It went on from a checkpoint of the killed attempt: one MLflow saw (killed_after epochs logged) or the
    # one just after it, since Ray Train persists an epoch's checkpoint before the epoch logger logs that
    # epoch's metrics, and the kill can land between the two (that epoch is logged from the checkpoint).
    assert (done[restart] - 1) % CHECKPOINT_EVERY == 0 and done[restart] - 1 <= killed_after + 1, done
    assert done[-1] == EPOCHS
