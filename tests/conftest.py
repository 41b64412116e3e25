"""Shared fixtures: one Ray instance and one MLflow store per test session, digits prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray reads this once, when it is imported, and only from the environment: its 60 s default is too short for
# a dashboard started on a loaded 2-core machine. The suite's subprocesses and their Ray instances inherit it.
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
# No usage telemetry from tests. Also: where MLflow 3.17 cannot reach its telemetry endpoint (this machine, an
# air-gapped cluster), a background thread removes a variable from os.environ at a random moment, and a request
# reading os.environ at that moment in another thread fails (KeyError; seen in bench/tracking_load.py).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def mlflow_uri(session_dir) -> str:
    """A SQLite MLflow store for the whole session, seen by the driver and (through the config) by workers."""
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(autouse=True)
def keep_mlflow_uris():
    """``mlflow.set_tracking_uri`` and ``set_registry_uri`` set process-wide globals and the variables
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI. The pipeline sets them only inside ``tracking.using`` and puts
    them back; a test that calls them itself, or fails inside a run, must leave neither to the tests after
    it, whose runs and registered models would go there."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {key: os.environ.get(key) for key in keys}
    yield
    if all(os.environ.get(key) == value for key, value in before.items()):
        return
    import mlflow

    # The setters write the variables too: set the globals back first, then the variables.
    mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session():
    """One throw-away local Ray for the session. More logical CPUs than cores, so a trial's driver,
    its two workers and Ray Data tasks never wait on each other on a 2-core machine. Skipped where Ray is
    not installed (the GPU machine of scripts/gpu-check has torch and pytest only)."""
    ray = pytest.importorskip("ray")

    auth = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only instance for tests
    # address="local": always a new instance, never a cluster that RAY_ADDRESS or a running `ray start` names.
    from pipeline import ray_worker

    # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs to free the
    # workers' placement group of a trial Tune stops; the hook tells it which Ray to ask (ray_worker).
    ray.init(address="local", num_cpus=4, include_dashboard=True, logging_level="WARNING", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": ray_worker.SETUP_HOOK})
    yield ray
    ray.shutdown()
    if auth is None:
        os.environ.pop("RAY_AUTH_MODE", None)


@pytest.fixture(scope="session")
def digits(session_dir) -> Path:
    from pipeline.data.prepare import prepare

    out = session_dir / "digits"
    prepare("digits", out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_overrides(digits, session_dir) -> list[str]:
    return [f"data.path={digits}", f"train.storage_path={session_dir / 'ray_results'}"]


@pytest.fixture(scope="session")
def digits_resnet8(digits) -> dict:
    """A resnet8 state dict after 20 SGD steps on digits (plain torch, one thread, no Ray): far better
    than chance, in seconds, and still miscalibrated enough for ECE to be far from 0."""
    import torch

    from pipeline.data.dataset import PreparedDataset
    from stkd import models
    from stkd.augment import nhwc_to_nchw, normalize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = PreparedDataset.open(digits)
        images, labels = dataset.load_numpy("train")
        x = normalize(nhwc_to_nchw(torch.from_numpy(images)), dataset.mean, dataset.std)
        y = torch.from_numpy(labels).long()
        torch.manual_seed(0)
        model = models.create("resnet8", 10, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(20):
            batch = torch.randint(0, len(x), (64,))
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def teacher_run(ray_session, mlflow_uri, tiny_overrides):
    """A ce teacher on digits, registered in MLflow as ``teacher-test-digits``; shared by the Ray tests."""
    from pipeline import config
    from pipeline.train import run

    cfg = config.load("test_tiny", tiny_overrides + ["mlflow.register_as=teacher-test-digits", "optim.epochs=3"])
    return run.train(cfg)


@pytest.fixture(scope="session")
def unique_images(tmp_path_factory) -> Path:
    """A prepared dataset whose every image is distinct, so rows can be told apart by content."""
    from fixtures_data import prepared_random_images

    return prepared_random_images(tmp_path_factory.mktemp("unique"), {"train": (23, 23, 23), "test": (11, 11, 11)},
                                  seed=0)


@pytest.fixture(scope="module")
def another_ray():
    """A second, idle Ray instance on this machine for as long as a module's tests run: what a shared
    machine (another user's Ray, a second local cluster) looks like to code that looks for "the" Ray."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    code = ("import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False, "
            "logging_level='ERROR'); print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = other.stdout.readline().strip()
    assert address, "the second Ray instance did not start"
    yield address
    other.stdin.close()  # its driver returns and ray.init's atexit shuts its instance down
    try:
        other.wait(timeout=60)
    except subprocess.TimeoutExpired:
        other.kill()
        other.wait()


@pytest.fixture(scope="session")
def s3_env():
    """moto's S3 server on loopback, in a thread of this process, with a bucket, and the AWS variables a user
    would set to point clients at it. The server binds port 0 and the OS picks the port as it binds, so no
    other process can take it between a check and the bind."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    from s3_store import BUCKET, client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    variables = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        client(variables).create_bucket(Bucket=BUCKET)
        yield variables
    finally:
        server.stop()


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny CPU models only wait on a second OpenMP thread when the
    2-core machine is busy (several seconds a step at load 18, about 9x slower than one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

