"""Storage on S3, against a real S3-compatible server on loopback (moto's, the ``s3_env`` fixture), configured
as a user would: AWS_ENDPOINT_URL, keys and region in the environment, train.storage_path=s3://bucket/...

A sweep on S3 (its trials' checkpoints, the Tune state, trials.csv, the plot, best_recipe.yaml), run one
trial at a time (``--max-concurrent 1``) and stopped with SIGTERM in the middle of its first trial; then
`stkd tune --resume` without a name, which finds the latest sweep on S3 by the time in its name (S3
prefixes have no modification time) and continues the stopped trial from its checkpoint on S3.
(`stkd teacher` checkpoints and `stkd log-run` on S3: tests/test_outage.py.)"""

from __future__ import annotations

import signal
import subprocess

import mlflow
import pytest

try:
    from tests.ray_nodes import VENV_BIN, env
    from tests.s3_store import BUCKET, keys
    from tests.test_autoscale import wait_for
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import VENV_BIN, env
    from s3_store import BUCKET, keys
    from test_autoscale import wait_for

EPOCHS = 4


def trial_runs(uri: str) -> list:
    c = mlflow.MlflowClient(tracking_uri=uri)
    experiment = c.get_experiment_by_name("stkd-tests")
    return [r for r in c.search_runs([experiment.experiment_id]) if "trial_id" in r.data.tags] if experiment else []


@pytest.mark.slow
@pytest.mark.e2e
def test_a_sweep_on_s3_stopped_mid_trial_resumes_from_its_checkpoint_on_s3(s3_env, digits, tmp_path, monkeypatch):
    (tmp_path / "space.yaml").write_text("method: ce\nparameters:\n  optim.lr: {distribution: grid, values: [0.05, 0.1]}\n")
    storage = f"s3://{BUCKET}/sweeps"
    # An older sweep of the same space, named before it: --resume must not pick it.
    for variable, value in s3_env.items():
        monkeypatch.setenv(variable, value)
    from pipeline import storage as run_storage
    from pipeline.sweep import trials

    run_storage.write_text(f"{storage}/tune-space-20200101-000000-0000/{trials.SWEEP_FILE}", "{}")
    args = [str(VENV_BIN / "stkd"), "tune", "--recipe", "test_tiny", "--space", str(tmp_path / "space.yaml"),
            "--samples", "1", "--scheduler", "fifo", "--max-concurrent", "1", f"data.path={digits}",
            f"train.storage_path={storage}", "train.workers=1", "train.cpus_per_worker=0.5", f"optim.epochs={EPOCHS}",
            "train.checkpoint_every=1"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # RAY_ADDRESS=local: each command starts its own Ray (which inherits the AWS variables), never joins
    # another cluster running on this machine.
    run_env = env(MLFLOW_TRACKING_URI=uri, RAY_ADDRESS="local", **s3_env)

    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(args, env=run_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        # The first trial's first checkpoint is on S3; its other epochs are still to come.
        wait_for(lambda: any(k.endswith("/checkpoint.pt") for k in keys(s3_env, "sweeps/tune-space-2026"))
                 or first.poll() is not None, 300, "the first trial's first checkpoint on S3", every=0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
    output = (tmp_path / "first.log").read_text()
    # Its own Ray beside the suite's: Ray Train's placement-group cleaner still finds its own (ray_worker).
    assert "Found multiple active Ray instances" not in output, output
    [stopped] = trial_runs(uri)  # --max-concurrent 1: the second trial had not started
    assert stopped.info.status == "KILLED", output
    name = output.split("sweep ", 1)[1].split(":", 1)[0]
    assert trials.STAMP.search(name), name
    assert trials.latest_sweep(storage, "tune-space-") == name

    again = subprocess.run([*args, "--resume"], env=run_env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    (tmp_path / "resumed.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"sweep {name}: 2 trials" in again.stdout
    parent = stopped.data.tags["mlflow.parentRunId"]
    assert f"MLflow parent run: {parent}" in again.stdout, "the resumed sweep keeps its MLflow parent run"

    runs = trial_runs(uri)
    c = mlflow.MlflowClient(tracking_uri=uri)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, "the stopped trial's run reopened"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "test/top1")]
        assert sorted(steps) == list(range(EPOCHS)), f"every epoch logged once: {steps}"
    # The stopped trial went on from a checkpoint on S3: its restored attempt did not train epoch 0 again.
    resumed = next(r for r in runs if r.info.run_id == stopped.info.run_id)
    setup_epochs = [m.step for m in c.get_metric_history(resumed.info.run_id, "setup_time_s")]
    assert len(setup_epochs) == 2 and setup_epochs[0] == 0 and setup_epochs[1] > 0, setup_epochs

    stored = keys(s3_env, f"sweeps/{name}/")
    files = {k.rsplit("/", 1)[-1] for k in stored}
    assert {"trials.csv", "accuracy_vs_hyperparameters.png", "best_recipe.yaml", trials.SWEEP_FILE, "tuner.pkl"} <= files
    checkpoints = [k for k in stored if k.endswith("/checkpoint.pt")]
    assert len({k.split("/")[2] for k in checkpoints}) == 2, f"each trial's checkpoint on S3: {checkpoints}"
    assert f"trials table: {storage}/{name}/trials.csv" in again.stdout
