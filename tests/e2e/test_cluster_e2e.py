"""End to end, as users run it: `ray job submit` to a real two-node Ray cluster with token auth on, logging
to a real MLflow tracking server; results checked through the server's REST API.

The cluster and the server are started by cluster/local/start.sh and cluster/local/mlflow_server.sh
(tests/e2e/conftest.py) and stopped by cluster/local/stop.sh. The dataset is prepared with the CLI on this
machine (its folder plays the shared storage); the teacher, the distillation, the sweep and a job with a
bad recipe all go through the `ray job submit` command line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv that runs the tests and the cluster: ray, stkd
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

EPOCHS = 2
TEACHER_NAME = "teacher-digits-wrn_16_2"  # what pipeline/recipes/demo_teacher.yaml registers


@pytest.fixture(scope="module")
def jobs(local_cluster) -> dict:
    """Prepare digits, train the teacher (a Ray job), then submit the distillation, the sweep and a job with
    a bad recipe side by side, and wait for all of them."""
    c = local_cluster
    data, runs = c.shared / "data" / "digits", c.shared / "runs"
    started = time.monotonic()
    prepared = subprocess.run([str(VENV_BIN / "stkd"), "prepare", "digits", "--out", str(data)], cwd=c.state,
                              env=c.plain_env, text=True, capture_output=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr

    tag = uuid.uuid4().hex[:6]
    ids = {name: f"e2e-{name}-{tag}" for name in ("teacher", "distill", "tune", "bad")}
    common = [f"data.path={data}", f"train.storage_path={runs}"]
    c.submit(ids["teacher"], "stkd", "teacher", "--recipe", "demo_teacher", *common, "optim.epochs=1",
             "mlflow.experiment=e2e-teacher")
    teacher = c.wait_jobs(ids["teacher"])[ids["teacher"]]
    assert teacher["status"] == "SUCCEEDED", f"{teacher}\n{c.logs(ids['teacher'])}"

    c.submit(ids["distill"], "stkd", "distill", "--recipe", "demo_student", *common, f"optim.epochs={EPOCHS}",
             "mlflow.experiment=e2e-distill")
    # FIFO: both trials run all their epochs, so both nested runs end FINISHED with their artifacts.
    c.submit(ids["tune"], "stkd", "tune", "--recipe", "demo_student", "--space", "demo", "--samples", "2",
             "--scheduler", "fifo", *common, f"optim.epochs={EPOCHS}", "mlflow.experiment=e2e-tune")
    c.submit(ids["bad"], "stkd", "distill", "--recipe", "demo_student", *common, "optim.lrr=0.1",
             "mlflow.experiment=e2e-bad")
    statuses = c.wait_jobs(ids["distill"], ids["tune"], ids["bad"])
    statuses[ids["teacher"]] = teacher
    elapsed = time.monotonic() - started
    sys.stderr.write(f"\n[e2e] jobs finished in {elapsed:.0f} s: "
                     + ", ".join(f"{sid} {j['status']}" for sid, j in statuses.items()) + "\n")
    return {"ids": ids, "status": statuses, "data": data, "runs": runs, "elapsed_s": elapsed}


def experiment_id(c, name: str) -> str:
    return c.mlflow("mlflow/experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    out = c.mlflow("mlflow/metrics/get-history", run_id=run_id, metric_key=key)
    return sorted((int(m["step"]), m["value"]) for m in out.get("metrics", []))


def artifacts(c, run_id: str, path: str = "") -> set[str]:
    out = c.mlflow("mlflow/artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    return {f["path"] for f in out.get("files", [])}


def artifact_text(c, run: dict, path: str) -> str:
    # mlflow-artifacts:/<experiment>/<run>/artifacts, served by the server's artifact proxy.
    root = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
    return c.http(f"{c.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/{root}/{path}", raw=True).decode()


def check_trained_run(c, run: dict, method: str) -> None:
    """A finished training run: per-epoch metrics, final metrics, recipe, learning curve, the model."""
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED", (run["info"], tags(run).get("end_reason"))
    assert tags(run)["method"] == method
    assert tags(run)["ray_version"] == "2.60.0"
    top1 = history(c, run_id, "test/top1")
    assert [step for step, _ in top1] == list(range(EPOCHS)), top1
    assert all(0.0 <= value <= 100.0 for _, value in top1)
    assert len(history(c, run_id, "loss/total")) == EPOCHS
    assert {"final/test_top1_selected", "final/test_top1_last", "final/wall_time_s"} <= set(metrics(run))
    assert {"recipe.yaml", "learning_curve.png"} <= artifacts(c, run_id)
    recipe = yaml.safe_load(artifact_text(c, run, "recipe.yaml"))
    assert recipe["method"]["name"] == method and recipe["optim"]["epochs"] == EPOCHS
    # The student, logged as an MLflow model of this run (MLflow 3 keeps it under models/<model_id>).
    outputs = (run.get("outputs") or {}).get("model_outputs") or []
    assert outputs, f"run {run_id} logged no model"
    model = c.mlflow(f"mlflow/logged-models/{outputs[0]['model_id']}")["model"]["info"]
    assert model["status"] == "LOGGED_MODEL_READY" and model["source_run_id"] == run_id
    root = model["artifact_uri"].removeprefix("mlflow-artifacts:/")
    files = c.http(f"{c.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts?path={root}")["files"]
    assert {"MLmodel", "data"} <= {f["path"] for f in files}


def test_two_node_cluster_with_token_auth(local_cluster):
    c = local_cluster
    nodes = c.http(f"{c.dashboard}/api/v0/nodes?limit=100", token=c.token)["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == 2 and sum(n["is_head_node"] for n in alive) == 1, nodes
    assert sum(n["resources_total"].get("CPU", 0) for n in alive) == 8

    # The job API refuses requests without the token, or with a wrong one ...
    for token, code in ((None, 401), ("not-the-token", 403)):
        with pytest.raises(urllib.error.HTTPError) as e:
            c.http(f"{c.dashboard}/api/jobs/", token=token)
        assert e.value.code == code
    # ... and so does the CLI without it.
    no_token = {k: v for k, v in c.client_env.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "list"], cwd=REPO, env=no_token, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode != 0 and "token authentication is enabled" in (proc.stdout + proc.stderr).lower()
    assert c.ray("job", "list").returncode == 0

    # The dashboard and MLflow listen on loopback only.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        host_ip = probe.getsockname()[0]
    except OSError:
        host_ip = "127.0.0.1"
    finally:
        probe.close()
    if not host_ip.startswith("127."):
        for url in (c.dashboard, c.mlflow_uri):
            port = int(url.rsplit(":", 1)[1])
            with pytest.raises(OSError):
                socket.create_connection((host_ip, port), timeout=5).close()


def test_teacher_job(local_cluster, jobs: dict):
    c = local_cluster
    assert jobs["status"][jobs["ids"]["teacher"]]["status"] == "SUCCEEDED"
    registered = c.mlflow("mlflow/registered-models/get", name=TEACHER_NAME)["registered_model"]
    assert registered["latest_versions"], registered
    (run,) = c.search_runs([experiment_id(c, "e2e-teacher")])
    assert run["info"]["status"] == "FINISHED" and tags(run)["method"] == "ce"


def test_distill_job(local_cluster, jobs: dict):
    c = local_cluster
    sid = jobs["ids"]["distill"]
    job = jobs["status"][sid]
    assert job["status"] == "SUCCEEDED", f"{job}\n{c.logs(sid)}"
    status = c.ray("job", "status", sid)
    assert "succeeded" in status.stdout + status.stderr

    (run,) = c.search_runs([experiment_id(c, "e2e-distill")])
    check_trained_run(c, run, "stkd")
    assert tags(run)["teacher_uri"].startswith(f"models:/{TEACHER_NAME}/")
    assert "teacher/test_top1" in metrics(run)
    assert "mlflow.parentRunId" not in tags(run)
    assert params(run)["train.storage_path"] == str(jobs["runs"])
    sys.stderr.write(f"[e2e] distill run {run['info']['run_name']} {run['info']['status']}: "
                     f"test/top1 {history(c, run['info']['run_id'], 'test/top1')}\n")
    # Ray Train's checkpoints went to train.storage_path, under the run's name.
    run_dir = jobs["runs"] / run["info"]["run_name"]
    assert any(p.name.startswith("checkpoint_") for p in run_dir.iterdir()), sorted(run_dir.iterdir())


def test_tune_job(local_cluster, jobs: dict):
    c = local_cluster
    sid = jobs["ids"]["tune"]
    job = jobs["status"][sid]
    assert job["status"] == "SUCCEEDED", f"{job}\n{c.logs(sid)}"

    runs = c.search_runs([experiment_id(c, "e2e-tune")])
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    parent = parents[0]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    assert metrics(parent)["trials"] == 2.0
    best = metrics(parent)["best/val_top1"]
    assert {"trials.csv", "best_recipe.yaml", "accuracy_vs_hyperparameters.png"} <= artifacts(c, parent_id)
    assert {"best.method.temperature", "best.method.mixup_alpha"} <= set(tags(parent))

    trials = c.search_runs([experiment_id(c, "e2e-tune")], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(trials) == 2 and len(runs) == 3
    for trial in trials:
        check_trained_run(c, trial, "stkd")
        assert tags(trial)["sweep_parent"] == parent_id and tags(trial)["trial_id"]
        assert 2.0 <= float(params(trial)["method.temperature"]) <= 6.0
        assert float(params(trial)["method.mixup_alpha"]) in (0.2, 1.0)
    # The winner is chosen on validation accuracy (the best epoch's, per trial), never on test.
    assert best == pytest.approx(max(max(v for _, v in history(c, t["info"]["run_id"], "val/top1")) for t in trials))

    sys.stderr.write(f"[e2e] sweep parent {parent['info']['run_name']} {parent['info']['status']}, best "
                     f"val/top1 {best:.2f}; trials: " + ", ".join(
                         f"{t['info']['run_name']} {t['info']['status']}" for t in trials) + "\n")
    # The best recipe, on the shared storage and as an artifact, runs as `stkd distill --recipe`.
    sweep_dir = jobs["runs"] / parent["info"]["run_name"]
    recipe = yaml.safe_load((sweep_dir / "best_recipe.yaml").read_text())
    assert recipe["method"]["temperature"] == pytest.approx(float(tags(parent)["best.method.temperature"]))
    assert yaml.safe_load(artifact_text(c, parent, "best_recipe.yaml")) == recipe


def test_bad_recipe_job_fails_with_the_validation_message(local_cluster, jobs: dict):
    c = local_cluster
    sid = jobs["ids"]["bad"]
    assert jobs["status"][sid]["status"] == "FAILED"
    logs = c.logs(sid)
    assert "optim.lrr: unknown key" in logs, logs
    assert "Traceback" not in logs, logs
    # Rejected before anything was scheduled or logged: no experiment, no run, and no run left RUNNING
    # anywhere on the server.
    with pytest.raises(urllib.error.HTTPError):
        experiment_id(c, "e2e-bad")
    experiments = c.mlflow("mlflow/experiments/search", {"max_results": 1000})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    running = c.search_runs(ids, "attributes.status = 'RUNNING'")
    assert not running, [(r["info"]["run_name"], r["info"]["status"]) for r in running]


def test_ray_job_stop_then_the_same_job_continues_the_same_run(local_cluster, jobs: dict):
    """`ray job stop` (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S) mid-run, then the same job
    submitted again: one MLflow run, FINISHED, every epoch once; the jobs STOPPED then SUCCEEDED."""
    c = local_cluster
    epochs, tag = 30, uuid.uuid4().hex[:6]
    job = ["stkd", "distill", "--recipe", "demo_student", f"data.path={jobs['data']}",
           f"train.storage_path={jobs['runs']}", f"optim.epochs={epochs}", f"train.run_name=e2e-stop-{tag}",
           "mlflow.experiment=e2e-stop"]
    first, second = f"e2e-stop-{tag}-1", f"e2e-stop-{tag}-2"
    c.submit(first, *job)

    def epochs_logged() -> int:
        try:
            runs = c.search_runs([experiment_id(c, "e2e-stop")])
        except urllib.error.HTTPError:  # the experiment does not exist yet
            return 0
        return len(history(c, runs[0]["info"]["run_id"], "loss/total")) if runs else 0

    deadline = time.monotonic() + 600
    while epochs_logged() < 3:
        assert c.job(first)["status"] in ("PENDING", "RUNNING"), c.logs(first)
        assert time.monotonic() < deadline, c.logs(first)
        time.sleep(1)
    c.ray("job", "stop", first)
    assert c.wait_jobs(first)[first]["status"] == "STOPPED"
    (run,) = c.search_runs([experiment_id(c, "e2e-stop")])
    assert run["info"]["status"] == "KILLED", (run["info"], tags(run))
    assert tags(run)["end_reason"].startswith("stopped by SIGTERM")
    assert f"train.run_name=e2e-stop-{tag}" in tags(run)["continue_with"]

    c.submit(second, *job)
    assert c.wait_jobs(second)[second]["status"] == "SUCCEEDED", c.logs(second)
    (resumed,) = c.search_runs([experiment_id(c, "e2e-stop")])
    assert resumed["info"]["run_id"] == run["info"]["run_id"] and resumed["info"]["status"] == "FINISHED"
    assert [step for step, _ in history(c, run["info"]["run_id"], "loss/total")] == list(range(epochs))
