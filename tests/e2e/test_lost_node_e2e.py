"""A lost worker node: a two-host Ray cluster made from network namespaces (tests/e2e/netns.py), the worker
host cut off and killed mid-run, and the run goes on as one MLflow run that logs every epoch once.

- fixed workers (``train.workers=2``, ``train.max_failures=1``): Ray Train waits for a node, the test brings
  up a new worker host, and the run restarts from its last checkpoint;
- elastic workers (``train.workers=[1, 2]``, ``train.max_failures=1``): the run restarts from its last
  checkpoint on the one worker left, at the same global batch.

One head serves both cases: the fixed case's replacement host is the one the elastic case loses. Every
host has 1 logical CPU and every worker takes 1, so the two workers of a run sit one per host. The head's
GCS checks its raylets every second and gives a node up after 3 missed checks, so that a lost node is
noticed in seconds rather than Ray's default half-minute or more. The driver (``stkd distill``) runs on the
head host, as `ray job submit` would put it; MLflow is a SQLite file that the test reads directly.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    from tests import ray_nodes
    from tests.e2e import netns
except ImportError:  # tests/ on sys.path (pytest's default rootdir handling)
    import ray_nodes
    from e2e import netns

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EPOCHS = 10
CUT_AFTER = 2  # epochs logged (each with its checkpoint) before the worker host is lost
GCS_PORT = 6379  # every host has its own ports: nothing else on the machine can hold this one
# Gloo finds its address by the machine's hostname, which every namespace shares and which resolves to
# loopback here: name the host's link instead (what a multi-homed machine does too). Workers inherit it.
GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
# How fast the head's GCS gives up on a silent node (Ray's defaults take 30 s or more).
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "3"}

# After a loss, an elastic group's first restart asks for the size that Ray Data's autoscaling coordinator
# last saw (it looks at the cluster every 20 s), and waits for that group to start: 60 s by default, then it
# tries again with the workers there are. Ray Train hands this variable from the driver to its controller.
GROUP_START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@dataclass
class NamespaceCluster:
    net: netns.Network
    folder: Path
    head: netns.Host
    data: Path
    workers: list[netns.Host] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    def env(self, **extra: str) -> dict[str, str]:
        return ray_nodes.env(**{ray_nodes.MARKER: str(self.folder)}, **extra)

    def start_node(self, host: netns.Host, args: list[str], **extra_env: str) -> None:
        """A Ray node in ``host``; returns once the nodes alive are the head and the worker hosts not lost.
        On this loaded 2-core machine a starting raylet can die or miss Ray's registration window (a raylet
        crashed in its start-up, ``node_manager.cc`` "Check failed", at a load average of 58): as
        tests/ray_nodes.py does, what it left is killed and it has one more try."""
        for attempt in range(2):
            node = self.net.start(host, [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", host.address,
                                         "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory",
                                         str(200 * 1024 * 1024), "--temp-dir",
                                         str(self.folder / f"ray-{host.label}-{attempt}"), *args],
                                  self.env(**{GLOO_IFNAME: "eth0", **extra_env}), f"ray-{host.label}-{attempt}.log")
            if self.wait_alive(node):
                return
            self.net.kill(host)  # every process of the failed start (no driver runs yet)
        raise AssertionError(f"the Ray node of {host.netns} did not come up, twice: see "
                             f"{self.folder}/ray-{host.label}-*.log")

    def join(self) -> netns.Host:
        """A fresh worker host: a new namespace whose Ray node joins the head; returns once it is alive."""
        host = self.net.host(f"w{len(self.workers) + 1}")
        self.workers.append(host)
        self.start_node(host, ["--address", self.address])
        return host

    def worker(self) -> netns.Host:
        """A live worker host: the one up, or a new one."""
        live = [w for w in self.workers if not w.lost]
        return live[-1] if live else self.join()

    def wait_alive(self, starting: subprocess.Popen, timeout: float = 180) -> bool:
        """Whether the nodes alive come to be exactly the head and the worker hosts not lost (a lost one
        noticed as dead, a new one joined) before ``timeout``, or before ``starting`` (the node being
        started) exits; asked on the head host by one driver that polls every second."""
        want = sorted([self.head.address, *(w.address for w in self.workers if not w.lost)])
        code = ("import ray, time\nfor attempt in range(30):  # the head's GCS may still be starting\n"
                f"    try: ray.init(address={self.address!r}, logging_level='ERROR'); break\n"
                "    except Exception: time.sleep(2)\n"
                f"while sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']) != {want!r}:\n"
                "    time.sleep(1)\n")
        poller = self.net.start(self.head, [sys.executable, "-c", code], self.env(), "nodes-alive.log")
        deadline = time.monotonic() + timeout
        while poller.poll() is None and starting.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if poller.poll() is None:
            poller.kill()
            poller.wait()
            return False
        return poller.returncode == 0

    def distill(self, name: str, *overrides: str) -> subprocess.Popen:
        """`stkd distill` (a CE resnet8 on digits, every epoch checkpointed) driven from the head host."""
        argv = [str(VENV_BIN / "stkd"), "distill", "--recipe", "demo_teacher", "model.student=resnet8",
                "mlflow.register_as=null", f"data.path={self.data}", f"train.storage_path={self.folder / 'runs'}",
                f"optim.epochs={EPOCHS}", "train.checkpoint_every=1", "train.cpus_per_worker=1",
                "train.max_failures=1", f"train.run_name={name}", f"mlflow.experiment={name}", *overrides]
        env = self.env(RAY_ADDRESS=self.address, MLFLOW_TRACKING_URI=self.tracking_uri, **GROUP_START_TIMEOUT)
        return self.net.start(self.head, argv, env, f"{name}.log", cwd=self.folder)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()


@pytest.fixture(scope="module")
def cluster(request) -> NamespaceCluster:
    why = netns.unavailable()
    if why:
        pytest.skip(f"a lost node needs hosts made from network namespaces: {why}")
    if not (VENV_BIN / "ray").exists() or not (VENV_BIN / "stkd").exists():
        pytest.skip(f"no ray/stkd next to {sys.executable}: run the tests from the project's venv (scripts/test)")
    folder = Path(tempfile.mkdtemp(prefix="stkd-ln-", dir="/tmp"))  # short: Ray's socket paths live under it
    net = netns.Network(folder)
    failures_before = request.session.testsfailed

    def close() -> None:
        net.close()
        left = net.leftovers() + [str(p) for p in ray_nodes.marked(f"{ray_nodes.MARKER}={folder}")]
        assert not left, f"left behind: {left}"
        ray_nodes.keep_if_failed(request, folder, failures_before, "lost-node tests")

    request.addfinalizer(close)
    started = time.monotonic()
    data = folder / "digits"
    prepared = subprocess.run([str(VENV_BIN / "stkd"), "prepare", "digits", "--out", str(data)], cwd=folder,
                              env=ray_nodes.env(), text=True, capture_output=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    c = NamespaceCluster(net, folder, net.host("head"), data)
    from mlflow.tracking import MlflowClient

    # The store made (and migrated) here, once: a driver and this test migrating a new SQLite file at
    # the same moment collide ("no such index").
    MlflowClient(c.tracking_uri).search_experiments()
    c.start_node(c.head, ["--head", "--port", str(GCS_PORT), "--include-dashboard", "false"], **HEALTH_CHECKS)
    sys.stderr.write(f"\n[e2e] head host {c.head.address} ({net.subnet}) up in {time.monotonic() - started:.0f} s\n")
    return c


def mlflow_run(c: NamespaceCluster, experiment: str):
    """The experiment's one run (None before it exists); fails on a second run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) <= 1, [r.info.run_name for r in runs]
    return runs[0] if runs else None


def steps(c: NamespaceCluster, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(c.tracking_uri).get_metric_history(run_id, key))


def train_workers_on(host: netns.Host) -> list[int]:
    """The Ray Train workers running in ``host`` (their process title names the actor class)."""
    found = []
    for pid in netns.Network.pids(host):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def lose_worker_mid_run(c: NamespaceCluster, name: str, driver: subprocess.Popen, host: netns.Host) -> dict:
    """Wait for ``CUT_AFTER`` epochs in MLflow (each checkpointed before it is logged), then cut the worker
    host's link and kill its processes. Returns what was seen then."""
    deadline = time.monotonic() + 300
    while True:
        assert driver.poll() is None, f"the run ended before the cut:\n{c.log(name)[-5000:]}"
        assert time.monotonic() < deadline, f"no {CUT_AFTER} epochs in 300 s:\n{c.log(name)[-5000:]}"
        run = mlflow_run(c, name)
        logged = len(steps(c, run.info.run_id, "loss/total")) if run else 0
        if logged >= CUT_AFTER:
            break
        time.sleep(0.5)
    workers = train_workers_on(host)
    assert workers, f"no Ray Train worker on {host.netns} to lose: {netns.Network.pids(host)}"
    killed = c.net.lose(host)
    sys.stderr.write(f"[e2e] {name}: {host.netns} ({host.address}) lost after {logged} epoch(s): link down, "
                     f"{len(killed)} process(es) killed, training worker(s) {workers}\n")
    return {"logged": logged, "run_id": run.info.run_id, "cut_at": time.monotonic()}


def finished_once(c: NamespaceCluster, name: str, driver: subprocess.Popen, run_id: str):
    """The run finished: the driver exited 0, one MLflow run, FINISHED, every epoch logged exactly once."""
    try:
        driver.wait(timeout=600)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not finish in 600 s:\n{c.log(name)[-5000:]}") from None
    assert driver.returncode == 0, f"{name} exited {driver.returncode}:\n{c.log(name)[-8000:]}"
    run = mlflow_run(c, name)
    assert run.info.run_id == run_id and run.info.status == "FINISHED", (run.info, c.log(name)[-3000:])
    for key in ("loss/total", "test/top1", "workers"):
        assert [s for s, _ in steps(c, run_id, key)] == list(range(EPOCHS)), (key, steps(c, run_id, key))
    return run


def resumed_at(c: NamespaceCluster, run_id: str) -> list[int]:
    """The epochs a worker group started at: each start reports its set-up time with its first epoch."""
    return [s for s, _ in steps(c, run_id, "setup_time_s")]


def test_fixed_workers_restart_from_the_last_checkpoint_when_a_new_node_joins(cluster):
    c = cluster
    lost = c.worker()
    name = f"lost-fixed-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    driver = c.distill(name, "train.workers=2")
    cut = lose_worker_mid_run(c, name, driver, lost)
    replacement = c.join()  # a new machine in the lost one's place: the fixed group waits for it
    sys.stderr.write(f"[e2e] {name}: new worker host {replacement.address} up "
                     f"{time.monotonic() - cut['cut_at']:.0f} s after the cut\n")
    run = finished_once(c, name, driver, cut["run_id"])
    starts = resumed_at(c, run.info.run_id)
    # One restart, from a checkpoint: not from epoch 0, and not before the epochs logged at the cut.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= cut["logged"], starts
    assert {v for _, v in steps(c, run.info.run_id, "workers")} == {2.0}
    sys.stderr.write(f"[e2e] {name}: FINISHED, one run, epochs 0..{EPOCHS - 1} once, restarted at epoch "
                     f"{starts[1]} on 2 workers; {time.monotonic() - started:.0f} s\n")


def test_elastic_workers_go_on_with_the_workers_left(cluster):
    c = cluster
    lost = c.worker()  # the fixed case's replacement when that case ran
    name = f"lost-elastic-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    driver = c.distill(name, "train.workers=[1, 2]")
    cut = lose_worker_mid_run(c, name, driver, lost)
    run = finished_once(c, name, driver, cut["run_id"])
    starts = resumed_at(c, run.info.run_id)
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= cut["logged"], starts
    workers = dict(steps(c, run.info.run_id, "workers"))
    # Two workers until the loss, one from the restart on (no node came back).
    assert all(workers[e] == 2.0 for e in range(starts[1])), workers
    assert all(workers[e] == 1.0 for e in range(starts[1], EPOCHS)), workers
    assert run.data.params["optim.batch_size"] == "64" and run.data.params["train.workers"] == "[1, 2]"
    assert run.data.tags["workers"] == "1-2"
    sys.stderr.write(f"[e2e] {name}: FINISHED, one run, epochs 0..{EPOCHS - 1} once, restarted at epoch "
                     f"{starts[1]} on 1 worker; {time.monotonic() - started:.0f} s\n")
