"""The cluster configs users deploy with: the launcher YAML through Ray's own validation, the KubeRay
manifests' structure, the runtime environments through Ray's RuntimeEnv, the local scripts' syntax."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
KUBERAY = CLUSTER / "kuberay"
RAY_VERSION = "2.60.0"
IMAGE = re.compile(r"^rayproject/ray:2\.60\.0-py311(-gpu)?$")
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
UPLOAD_EXCLUDES = {".venv", "data", "runs", "mlflow.db", "stkd-demo", ".git"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


# --- Ray cluster launcher --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher() -> dict:
    return load(CLUSTER / "cluster.yaml")


def test_launcher_config_passes_rays_validation(launcher):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(launcher)
    prepared = prepare_config(copy.deepcopy(launcher))  # merged with Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert not re.match(r"^(p|g)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"
    assert workers and all(re.match(r"^(p|g)\d", w["node_config"]["InstanceType"]) for w in workers)
    assert all(w.get("min_workers", 0) == 0 and w["max_workers"] >= 1 for w in workers)
    assert launcher["max_workers"] >= max(w["max_workers"] for w in workers)
    assert launcher["docker"]["worker_image"].endswith("-gpu")
    for key in ("head_image", "worker_image"):
        assert IMAGE.match(launcher["docker"][key]), launcher["docker"][key]


def test_launcher_installs_the_project_with_the_pins(launcher):
    pins = CONSTRAINTS.read_text()
    for pin in ("torch==2.13.0", f"ray=={RAY_VERSION}", "mlflow==3.17.2"):
        assert pin in pins
    setup = " ".join(launcher["setup_commands"])
    assert "-c ~/stkd-ray/constraints.txt" in setup and "-e ~/stkd-ray" in setup
    assert launcher["file_mounts"]["~/stkd-ray"] == "."
    assert UPLOAD_EXCLUDES <= set(launcher["rsync_exclude"])


def test_launcher_keeps_token_auth_on(launcher):
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert not any("RAY_AUTH_MODE=disabled" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])


def test_launcher_puts_storage_on_shared_storage(launcher):
    text = (CLUSTER / "cluster.yaml").read_text()
    assert "train.storage_path=/mnt/shared/runs" in text and "s3://" in text
    assert any("/mnt/shared" in c and "nfs" in c for c in launcher["initialization_commands"])
    assert "-v /mnt/shared:/mnt/shared" in launcher["docker"]["run_options"]


# --- KubeRay -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load(KUBERAY / "raycluster.yaml")


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def assert_token_auth(container: dict) -> None:
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE") == "token", container["name"]
    assert env["RAY_AUTH_TOKEN"]["secretKeyRef"] == {"name": "stkd-ray-auth", "key": "auth_token"}


def test_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == RAY_VERSION and spec["enableInTreeAutoscaling"] is True

    (head,) = containers(spec["headGroupSpec"]["template"])
    assert IMAGE.match(head["image"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is CPU only"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert_token_auth(head)
    assert env_of({"name": "autoscaler", "env": spec["autoscalerOptions"]["env"]})["RAY_AUTH_MODE"] == "token"

    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = containers(group["template"])
    assert worker["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert_token_auth(worker)
    for template in (spec["headGroupSpec"]["template"], group["template"]):
        mounts = {m["mountPath"] for c in containers(template) for m in c.get("volumeMounts", [])}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert "/mnt/shared" in mounts and claims == {"stkd-shared"}

    storage = load(KUBERAY / "storage.yaml")
    assert storage["kind"] == "PersistentVolumeClaim" and storage["metadata"]["name"] == "stkd-shared"
    assert storage["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("manifest, command", [("rayjob-distill.yaml", "stkd distill"),
                                               ("rayjob-tune.yaml", "stkd tune")])
def test_rayjob_structure(raycluster, manifest, command):
    from ray.runtime_env import RuntimeEnv

    job = load(KUBERAY / manifest)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    assert spec["entrypoint"].startswith(command + " ")
    assert "train.storage_path=/mnt/shared/" in spec["entrypoint"] and "train.use_gpu=true" in spec["entrypoint"]

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert any("constraints.txt" in p for p in runtime_env["pip"]["packages"])

    (submitter,) = containers(spec["submitterPodTemplate"])
    assert IMAGE.match(submitter["image"])
    assert_token_auth(submitter)


def test_tune_rayjob_arguments_parse():
    """The sweep's entrypoint is a valid `stkd tune` command line (parsed by the real parser)."""
    import shlex

    from pipeline.cli import build_parser

    for manifest in ("rayjob-distill.yaml", "rayjob-tune.yaml"):
        argv = shlex.split(load(KUBERAY / manifest)["spec"]["entrypoint"])
        assert argv[0] == "stkd"
        args = build_parser().parse_args(argv[1:])
        assert args.recipe == "demo_student"
        assert all("=" in o for o in args.overrides)


# --- runtime environments for `ray job submit` ---------------------------------------------------------------

@pytest.mark.parametrize("path", [CLUSTER / "runtime_env.yaml", KUBERAY / "runtime_env.yaml"])
def test_runtime_env(path):
    from ray.runtime_env import RuntimeEnv

    runtime_env = load(path)
    RuntimeEnv(**runtime_env)
    assert UPLOAD_EXCLUDES <= set(runtime_env["excludes"])
    assert "working_dir" not in runtime_env, "given on the command line: --working-dir ."
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_local_runtime_env_installs_nothing():
    """The local cluster's nodes run from the project's venv and the launcher's have the project
    installed: a job must not reach for a package index."""
    runtime_env = load(CLUSTER / "runtime_env.yaml")
    assert not {"pip", "uv", "conda"} & set(runtime_env)
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


# --- local scripts -------------------------------------------------------------------------------------------

SCRIPTS = ["start.sh", "stop.sh", "mlflow_server.sh"]


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_local_script_syntax(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    text = (CLUSTER / "local" / script).read_text()
    subprocess.run([bash, "-n", str(CLUSTER / "local" / script)], check=True)
    if script != "common.sh":
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert "RAY_AUTH_MODE=disabled" not in text
        out = subprocess.run([bash, str(CLUSTER / "local" / script), "--help"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0 and "Usage:" in out.stdout


def test_local_scripts_bind_loopback_and_keep_token_auth():
    start = (CLUSTER / "local" / "start.sh").read_text()
    assert "--node-ip-address 127.0.0.1" in start and "--dashboard-host 127.0.0.1" in start
    assert "export RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH" in start
    mlflow = (CLUSTER / "local" / "mlflow_server.sh").read_text()
    assert "--host 127.0.0.1" in mlflow and "--serve-artifacts" in mlflow and "sqlite:///" in mlflow
    stop = (CLUSTER / "local" / "stop.sh").read_text()
    assert not re.search(r"^\s*(ray stop|pkill|killall)", stop, re.M)
