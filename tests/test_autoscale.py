"""A sweep started on a cluster too small for one trial waits for a node and says what it waits for; with
no node after ``--resource-timeout`` seconds it ends with exit status 2 and the command that continues it;
that command, run again, runs its trials once a node joins (`ray start --address`), as an autoscaler would
add one."""

from __future__ import annotations

import re
import subprocess
import time

import mlflow
import pytest

try:
    from tests.ray_nodes import VENV_BIN, Cluster
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import VENV_BIN, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SPACE = "method: ce\nparameters:\n  optim.lr: {distribution: grid, values: [0.05, 0.1]}\n"
TIMEOUT_S = 30  # past the first progress line (every 15 s), which must show both trials waiting


def wait_for(predicate, timeout: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_sweep_waits_for_a_node_times_out_and_resumed_runs_when_it_joins(digits, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cluster = Cluster(head_cpus=1, folder=tmp_path)  # a trial's worker needs 2 CPUs: nothing fits
    args = [str(VENV_BIN / "stkd"), "tune", "--recipe", "test_tiny", "--space", str(tmp_path / "space.yaml"),
            "--samples", "1", "--scheduler", "fifo", "--name", "autoscale", f"data.path={digits}",
            f"train.storage_path={tmp_path / 'runs'}", "train.workers=1", "train.cpus_per_worker=2", "optim.epochs=1"]
    env = cluster.client_env(MLFLOW_TRACKING_URI=uri)
    log = tmp_path / "sweep.log"
    driver = None
    try:
        with open(tmp_path / "first.log", "w") as out:
            driver = subprocess.Popen([*args, "--resource-timeout", str(TIMEOUT_S)], env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
        first = tmp_path / "first.log"
        # A first summary may still say "1 running ... 1 pending": wait for the line with both running.
        wait_for(lambda: ("wait for resources ({'CPU': 2.0} each" in first.read_text()
                          and "trials: 2 running, 0 finished" in first.read_text()) or driver.poll() is not None,
                 240, "the progress line to say what the trials wait for")
        assert "trials: 2 running, 0 finished" in first.read_text(), "both trials run, their workers wait: no cap"
        # No node joins: the sweep ends, saved, with the command that continues it.
        assert driver.wait(timeout=240) == 2, first.read_text()
        ended = first.read_text()
        assert f"sweep autoscale: for {TIMEOUT_S} s no trial progressed while" in ended, ended
        continue_with = re.search(r"then continue it with: (stkd tune --resume .*)$", ended, re.M)
        assert continue_with and " --name autoscale " in f"{continue_with.group(1)} ", ended

        with open(log, "w") as out:
            driver = subprocess.Popen([*args, "--resume"], env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "wait for resources ({'CPU': 2.0} each" in log.read_text() or driver.poll() is not None,
                 240, "the resumed sweep to wait for resources")
        cluster.join(cpus=4)
        assert driver.wait(timeout=240) == 0, log.read_text()
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        cluster.stop()
    text = log.read_text()
    assert "sweep autoscale: 2 trials; best validation top-1" in text, text
    # The sweep's last table: both trials done, with their learning rates and epochs.
    lines = text.splitlines()
    header = max(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "status"])
    assert lines[header].split() == ["trial", "status", "optim.lr", "epoch", "val/top1", "img/s"], text
    rows = sorted(line.split()[1:4] for line in lines[header + 1:header + 3])
    assert rows == [["done", "0.05", "1/1"], ["done", "0.1", "1/1"]], text
    c = mlflow.MlflowClient(tracking_uri=uri)
    runs = [r for r in c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id]) if "trial_id" in r.data.tags]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
