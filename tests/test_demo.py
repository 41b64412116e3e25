"""`stkd demo` as a user runs it: its whole console output, and the MLflow parent run that groups its runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import mlflow
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MAX_LINES = 80  # the demo's whole output fits on one screen
ANOTHER_RAY = re.compile(r"\(PlacementGroupCleaner pid=\d+\)")


def test_the_demo_reads_on_one_screen_and_groups_its_runs_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=uri)
    done = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--out", str(tmp_path / "demo"),
                           "--teacher-epochs", "2", "--student-epochs", "1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    # With this suite's Ray running too, Ray Train's placement group cleaner finds two Ray instances on
    # the machine and prints a traceback each run; a user's machine with one Ray shows none of it.
    lines = [line for line in output.splitlines() if not ANOTHER_RAY.search(line)]
    assert len(lines) <= MAX_LINES, output
    assert not [line for line in lines if "Reporting training result" in line or "PreemptionWatcher" in line], output
    assert sum(bool(re.match(r"epoch +\d+/\d+ ", line)) for line in lines) == 2 + 3 * 1, output  # one per epoch
    for what in ("teacher wrn_16_2", "ce student resnet8", "kd student resnet8", "stkd student resnet8"):
        assert re.search(rf"^{what} +\d+\.\d\d", output, re.M), what

    c = mlflow.MlflowClient(tracking_uri=uri)
    experiment = c.get_experiment_by_name("stkd-demo")
    [parent] = c.search_runs([experiment.experiment_id], "tags.kind = 'demo'")
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("demo-s0-")
    children = c.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name.rsplit("-", 1)[0] for r in children)
    assert names == ["ce-resnet8-s0", "ce-wrn_16_2-s0", "kd-wrn_16_2-resnet8-s0", "stkd-wrn_16_2-resnet8-s0"]
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"demo_table.md", "demo_comparison.png"}
    assert parent.data.metrics["stkd/test_top1_selected"] == next(
        r for r in children if r.info.run_name.startswith("stkd")).data.metrics["final/test_top1_selected"]
