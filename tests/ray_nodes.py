"""Throw-away Ray nodes for the tests that need a cluster of their own: a head with too few CPUs, a node
joined later with `ray start --address`, a sweep driver killed and restarted against the same cluster.

Each node is one `ray start --block` process, started in its own session, with a marker in its
environment (``STKD_TEST_RAY=<folder>``); ``stop`` ends exactly the processes carrying that marker, by
PID (never `ray stop`, which would stop every Ray of this user on the machine).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
MARKER = "STKD_TEST_RAY"


def free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def port_block(span: int = 120) -> int:
    """The first of ``span`` free ports below the ephemeral range, where Ray draws its own."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - span, 10)
        if all(free(p) for p in range(base, base + span)):
            return base
    raise RuntimeError("no block of free ports between 20000 and 32000")


def env(**extra: str) -> dict[str, str]:
    """This machine's environment for a throw-away local Ray: no auth (loopback only), no usage stats.
    Without the session's MLFLOW_TRACKING_URI: a node would hand it to every worker, where it beats the
    tracking store that the job's own driver names."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "STKD_LOCAL")) and k != "MLFLOW_TRACKING_URI"}
    out.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}{os.pathsep}{out['PATH']}")
    out.update(extra)
    return out


class Cluster:
    """A head node, nodes joined to it on demand, and the environment of a client that uses it."""

    def __init__(self, head_cpus: float, folder: Path):
        self.folder = folder
        self.base = port_block()
        self.port = self.base
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        # Short temp dirs: Ray's unix socket paths must stay under 107 characters.
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.start(["--head", "--port", str(self.port), "--include-dashboard", "false", "--num-gpus", "0"],
                   head_cpus, offset=1)

    def client_env(self, **extra: str) -> dict[str, str]:
        return env(RAY_ADDRESS=self.address, **extra)

    def start(self, args: list[str], cpus: float, offset: int) -> None:
        first = self.base + 10 * offset
        ports = ["--node-manager-port", str(first), "--object-manager-port", str(first + 1),
                 "--dashboard-agent-listen-port", str(first + 2), "--dashboard-agent-grpc-port", str(first + 3),
                 "--runtime-env-agent-port", str(first + 4), "--metrics-export-port", str(first + 5),
                 "--min-worker-port", str(self.base + 40 + 40 * (offset - 1)),
                 "--max-worker-port", str(self.base + 79 + 40 * (offset - 1))]
        n = len(self.nodes)
        # Ray gives a starting raylet 30 s to register; on a loaded 2-core machine that can pass: one more try.
        for attempt in range(2):
            log = open(self.folder / f"ray-node{n}-{attempt}.log", "w")
            node = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                 "--object-store-memory", str(200 * 1024 * 1024), "--temp-dir", str(self.temp / f"n{n}{attempt}"),
                 *ports, *args],
                env=env(**{MARKER: str(self.temp)}), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self.wait_nodes(n + 1, node):
                self.nodes.append(node)
                return
            if node.poll() is None:
                break
            for pid in marked(f"{MARKER}={self.temp}", also=str(self.temp / f"n{n}{attempt}")):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # what the failed start left behind, holding its ports
        self.stop()
        raise RuntimeError(f"the cluster did not reach {n + 1} node(s): see {self.folder}/ray-node*.log")

    def join(self, cpus: float) -> None:
        """A second node, as `ray start --address` on a new machine would add it."""
        self.start(["--address", self.address], cpus, offset=2)

    def wait_nodes(self, count: int, starting: subprocess.Popen, timeout: float = 120) -> bool:
        """Whether ``count`` nodes are alive before ``timeout``, or ``starting`` exits."""
        code = ("import ray; ray.init(logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and starting.poll() is None:
            out = subprocess.run([sys.executable, "-c", code], env=self.client_env(), capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        """SIGTERM to the nodes, then SIGKILL to every process carrying this cluster's marker."""
        for node in reversed(self.nodes):  # the node being started, if any, carries the marker below
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for pid in marked(f"{MARKER}={self.temp}"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def marked(tag: str, also: str = "") -> list[int]:
    """The processes whose environment holds ``tag`` (and whose command line holds ``also``)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                if (tag.encode() in open(f"/proc/{name}/environ", "rb").read().split(b"\0")
                        and also.encode() in open(f"/proc/{name}/cmdline", "rb").read()):
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def keep_if_failed(request, folder: Path, failures_before: int, what: str) -> None:
    """At a fixture's end: ``folder`` (logs, state) kept and named when a test failed since
    ``failures_before`` (``request.session.testsfailed`` at its start), removed otherwise."""
    if request.session.testsfailed > failures_before:
        sys.stderr.write(f"[e2e] {what} failed: logs kept in {folder}\n")
    else:
        shutil.rmtree(folder, ignore_errors=True)
