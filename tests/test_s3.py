"""Storage on S3, against a real S3-compatible server on loopback (moto's, started here), configured as a
user would: AWS_ENDPOINT_URL, keys and region in the environment, train.storage_path=s3://bucket/...

One sweep on S3 (its trials' checkpoints, the Tune state, trials.csv, the plot, best_recipe.yaml), then
`stkd tune --resume` without a name, which finds the latest sweep on S3 by the time in its name (S3
prefixes have no modification time)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

try:
    from tests.ray_nodes import VENV_BIN, env, port_block
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import VENV_BIN, env, port_block

BUCKET = "stkd-test"


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, a bucket, and the AWS variables that point clients at it."""
    port = port_block(span=1)
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    variables = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's server did not start on {endpoint}")
                time.sleep(0.5)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield variables
    finally:
        server.terminate()
        server.wait(timeout=20)


def keys(s3_env, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
@pytest.mark.e2e
def test_a_sweep_on_s3_and_its_resume(s3_env, digits, tmp_path, monkeypatch):
    (tmp_path / "space.yaml").write_text("method: ce\nparameters:\n  optim.lr: {distribution: grid, values: [0.05, 0.1]}\n")
    storage = f"s3://{BUCKET}/sweeps"
    # An older sweep of the same space, named before it: --resume must not pick it.
    for variable, value in s3_env.items():
        monkeypatch.setenv(variable, value)
    from pipeline import storage as run_storage
    from pipeline.sweep import trials

    run_storage.write_text(f"{storage}/tune-space-20200101-000000-0000/{trials.SWEEP_FILE}", "{}")
    args = [str(VENV_BIN / "stkd"), "tune", "--recipe", "test_tiny", "--space", str(tmp_path / "space.yaml"),
            "--samples", "1", "--scheduler", "fifo", f"data.path={digits}", f"train.storage_path={storage}",
            "train.workers=1", "train.cpus_per_worker=0.5", "optim.epochs=1"]
    # RAY_ADDRESS=local: each command starts its own Ray (which inherits the AWS variables), never joins
    # another cluster running on this machine.
    run_env = env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_ADDRESS="local", **s3_env)

    first = subprocess.run(args, env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    (tmp_path / "first.log").write_text(first.stdout + first.stderr)
    assert first.returncode == 0, first.stdout + first.stderr
    name = first.stdout.split("sweep ", 1)[1].split(":", 1)[0]
    assert trials.STAMP.search(name), name
    stored = keys(s3_env, f"sweeps/{name}/")
    files = {k.rsplit("/", 1)[-1] for k in stored}
    assert {"trials.csv", "accuracy_vs_hyperparameters.png", "best_recipe.yaml", trials.SWEEP_FILE, "tuner.pkl"} <= files
    checkpoints = [k for k in stored if k.endswith("/checkpoint.pt")]
    assert len({k.split("/")[2] for k in checkpoints}) == 2, f"each trial's checkpoint on S3: {checkpoints}"
    assert f"trials table: {storage}/{name}/trials.csv" in first.stdout
    assert trials.latest_sweep(storage, "tune-space-") == name

    again = subprocess.run([*args, "--resume"], env=run_env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    (tmp_path / "resumed.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"sweep {name}: 2 trials" in again.stdout
    parent = [line for line in first.stdout.splitlines() if line.startswith("MLflow parent run")]
    assert parent and parent[0] in again.stdout, "the resumed sweep keeps its MLflow parent run"
