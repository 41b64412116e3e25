"""`cluster/local/mlflow_server.sh --backend postgresql`: an MLflow server on a PostgreSQL server of its
own, reached as every job reaches the tracking server, and `cluster/local/stop.sh` stopping both by the
PIDs they recorded, with nothing of either left running."""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline import tracking

try:
    from tests.ray_nodes import port_block
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    from ray_nodes import port_block

LOCAL = Path(__file__).resolve().parent.parent / "cluster" / "local"
HAS_POSTGRES = bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not installed (apt-get install postgresql)")]


def marked(marker: str, state: Path) -> list[int]:
    """Processes whose environment carries the scripts' marker for this state folder."""
    tag = f"{marker}={state}".encode()
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                pids.append(int(name))
        except OSError:
            pass
    return pids


def command_lines(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return out


@pytest.fixture
def state_folder(tmp_path):
    """A state folder whose parents PostgreSQL's own user can pass through: as root the server runs as
    `postgres`, and pytest's folders are closed to other users."""
    if os.getuid() != 0:
        yield tmp_path / "state"
        return
    parent = Path(tempfile.mkdtemp(prefix="stkd-postgres-", dir="/tmp"))
    parent.chmod(0o711)
    yield parent / "state"
    shutil.rmtree(parent, ignore_errors=True)


def test_the_server_user_must_reach_the_state_folder(tmp_path):
    if os.getuid() != 0:
        pytest.skip("only root hands the server to the postgres user")
    done = subprocess.run([str(LOCAL / "mlflow_server.sh"), "--state", str(tmp_path / "state"), "--backend",
                           "postgresql", "--port", "1", "--pg-port", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "which cannot reach" in done.stderr, done.stderr


def test_an_mlflow_server_on_its_own_postgresql_keeps_runs_and_stops_by_pid(state_folder):
    pytest.importorskip("psycopg2")
    import psycopg2

    state = state_folder
    port = port_block(span=2)
    mlflow_port, pg_port = port, port + 1
    started = subprocess.run([str(LOCAL / "mlflow_server.sh"), "--state", str(state), "--port", str(mlflow_port),
                              "--workers", "1", "--backend", "postgresql", "--pg-port", str(pg_port)],
                             capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"127.0.0.1:{pg_port}, database mlflow" in started.stdout
        assert "backend postgresql" in started.stdout
        pgpass = state / "postgres" / "pgpass"
        assert stat.S_IMODE(pgpass.stat().st_mode) == 0o600, "the password file is readable by its owner only"
        password = pgpass.read_text().strip().rsplit(":", 1)[1]
        running = marked("STKD_LOCAL_POSTGRES", state) + marked("STKD_LOCAL_MLFLOW", state)
        assert not [line for line in command_lines(running) if password in line], "no password on a command line"

        uri = f"http://127.0.0.1:{mlflow_port}"
        with tracking.tracked_run(uri, "postgres-backend", "run", {"optim.lr": 0.1}) as run_id:
            tracking.log_metrics(uri, run_id, {"test/top1": 50.0}, step=0)
            tracking.log_metrics(uri, run_id, {"test/top1": 60.0}, step=1)
        c = tracking.client(uri)
        assert c.get_run(run_id).info.status == "FINISHED"
        assert [m.value for m in c.get_metric_history(run_id, "test/top1")] == [50.0, 60.0]

        # The rows are in PostgreSQL itself, read with the pgpass file as any libpq client would.
        os.environ["PGPASSFILE"] = str(pgpass)
        try:
            with psycopg2.connect(host="127.0.0.1", port=pg_port, user="stkd", dbname="mlflow") as connection:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
                    assert cursor.fetchone() == ("FINISHED",)
                    cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'test/top1'", (run_id,))
                    assert cursor.fetchone() == (2,)
            connection.close()
        finally:
            del os.environ["PGPASSFILE"]
        # Concurrent trials through the project's tracking path (bench/tracking_load.py, made short).
        from test_tracking_load import bench_module, check_load

        check_load(bench_module(), uri, state)
        postmaster = int((state / "postgres.pid").read_text())
    finally:
        stopped = subprocess.run([str(LOCAL / "stop.sh"), "--mlflow-only", "--state", str(state)],
                                 capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not marked("STKD_LOCAL_POSTGRES", state) and not marked("STKD_LOCAL_MLFLOW", state), "nothing left"
    assert not Path(f"/proc/{postmaster}").exists()
    log = (state / "postgres" / "log" / "postgres.log").read_text()
    assert "received fast shutdown request" in log and "database system is shut down" in log, log[-2000:]
    assert not (state / "postgres.pid").exists() and not (state / "mlflow.pid").exists()
