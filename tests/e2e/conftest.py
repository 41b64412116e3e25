"""Fixtures for the end-to-end tests: a real local two-node Ray cluster (token auth on) and a real MLflow
tracking server, started and stopped with the scripts users run (cluster/local/*.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests.ray_nodes import keep_if_failed, port_block
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import keep_if_failed, port_block

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "cluster" / "local"
# The venv these tests run in: its bin holds `ray`, `mlflow` and `stkd`, and the cluster's nodes run from it.
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment variables of the calling shell that must not leak into the scripts or the CLI calls.
SCRUB = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
         "MLFLOW_TRACKING_URI", "STKD_CLUSTER_STATE", "STKD_LOCAL_CLUSTER", "STKD_LOCAL_MLFLOW")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class LocalCluster:
    """The running cluster and server, and the client side a user has after `source $STATE/env.sh`."""

    state: Path
    dashboard: str
    mlflow_uri: str
    client_env: dict[str, str]
    runtime_env: Path
    shared: Path
    token: str
    plain_env: dict[str, str]  # this machine's environment without Ray/MLflow settings, venv bin on PATH
    submitted: list[str] = field(default_factory=list)

    # --- Ray: the real CLI for what users type, the REST API for polling ---------------------------------

    def ray(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VENV_BIN / "ray"), *args], cwd=REPO, env=self.client_env, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit --no-wait --working-dir . --runtime-env <runtime env> -- <entrypoint>`."""
        self.submitted.append(submission_id)
        return self.ray("job", "submit", "--no-wait", "--submission-id", submission_id, "--working-dir", ".",
                        "--runtime-env", str(self.runtime_env), "--", *entrypoint)

    def job(self, submission_id: str) -> dict[str, Any]:
        return self.http(f"{self.dashboard}/api/jobs/{submission_id}", token=self.token)

    def wait_jobs(self, *submission_ids: str, timeout: float = 900) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = {sid: self.job(sid) for sid in submission_ids}
            if all(j["status"] in TERMINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                states = {sid: j["status"] for sid, j in jobs.items()}
                raise AssertionError(f"jobs still not finished after {timeout:.0f} s: {states}")
            time.sleep(3)

    def logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", submission_id).stdout

    # --- MLflow REST API ----------------------------------------------------------------------------------

    def mlflow(self, path: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
        url = f"{self.mlflow_uri}/api/2.0/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return self.http(url, body=body)

    def search_runs(self, experiment_ids: list[str], filter_string: str = "") -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        token = None
        while True:
            body = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": 1000,
                    **({"page_token": token} if token else {})}
            out = self.mlflow("mlflow/runs/search", body)
            runs += out.get("runs", [])
            token = out.get("next_page_token")
            if not token:
                return runs

    @staticmethod
    def http(url: str, body: dict[str, Any] | None = None, token: str | None = None,
             raw: bool = False) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return payload if raw else json.loads(payload)


def _run_script(name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPTS / name), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, what: str, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"{what} did not finish in {timeout:.0f} s:\n{out}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{out}")
    return out


def _read_env_sh(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def local_cluster(request) -> LocalCluster:
    """cluster/local/start.sh (head + worker node, token auth) and cluster/local/mlflow_server.sh on free
    ports, in a fresh state folder; cluster/local/stop.sh in the finalizer, whatever the tests did."""
    for tool in ("bash", "setsid", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"the local cluster scripts need {tool}")
    if not (VENV_BIN / "ray").exists() or not (VENV_BIN / "stkd").exists():
        pytest.skip(f"no ray/stkd next to {sys.executable}: run the tests from the project's venv (scripts/test)")

    # Short path: Ray's unix sockets live under it.
    state = Path(tempfile.mkdtemp(prefix="stkd-e2e-", dir="/tmp"))
    base = port_block(320)  # base..base+2 here, base+10..base+309 for the nodes' internal ports
    gcs, dashboard, mlflow_port = base, base + 1, base + 2
    script_env = clean_env(STKD_VENV_BIN=str(VENV_BIN), STKD_STOP_GRACE_S="20")
    failures_before = request.session.testsfailed

    def stop() -> None:
        out = subprocess.run(["bash", str(SCRIPTS / "stop.sh"), "--state", str(state)], cwd=REPO, env=script_env,
                             text=True, capture_output=True, timeout=180)
        sys.stderr.write(f"\n[e2e] stop.sh:\n{out.stdout}{out.stderr}")
        keep_if_failed(request, state, failures_before, "tests")

    request.addfinalizer(stop)
    started = time.monotonic()
    mlflow_proc = _run_script("mlflow_server.sh", "--state", str(state), "--port", str(mlflow_port), env=script_env)
    ray_proc = _run_script("start.sh", "--state", str(state), "--port", str(gcs), "--dashboard-port",
                           str(dashboard), "--port-base", str(base + 10), "--head-cpus", "4", "--worker-cpus", "4",
                           env=script_env)
    out = _finish(mlflow_proc, "mlflow_server.sh") + _finish(ray_proc, "start.sh")
    sys.stderr.write(f"[e2e] cluster and MLflow server up in {time.monotonic() - started:.0f} s:\n{out}")

    # What a user gets from `source $STATE/env.sh`.
    user_env = _read_env_sh(state / "env.sh")
    assert user_env["RAY_AUTH_MODE"] == "token"
    mlflow_uri = (state / "mlflow_uri").read_text().strip()
    assert mlflow_uri == f"http://127.0.0.1:{mlflow_port}"

    # The shipped runtime env, pointed at this test's MLflow server instead of the default port.
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = mlflow_uri
    runtime_env_path = state / "runtime_env.yaml"
    runtime_env_path.write_text(yaml.safe_dump(runtime_env))

    shared = state / "shared"
    shared.mkdir()
    return LocalCluster(state=state, dashboard=user_env["RAY_ADDRESS"], mlflow_uri=mlflow_uri,
                        client_env=clean_env(**user_env), runtime_env=runtime_env_path, shared=shared,
                        token=Path(user_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip(), plain_env=clean_env())
