"""Hosts made from Linux network namespaces, so that a test can lose a whole node of a Ray cluster.

A :class:`Network` is a bridge in the root namespace with an address on a private /24 (10.x.y.1); each
:class:`Host` is a namespace (``ip netns add``) with loopback up and one end of a veth pair (``eth0``, its
own address on the /24), whose other end is plugged into the bridge. A Ray node started in a host
(``ip netns exec``) binds its own address (``--node-ip-address``) and sees the other hosts only through
the bridge; ports are per namespace, so nothing here can collide with another test's Ray on the machine.

Losing a host is what a machine's failure looks like from the cluster: :meth:`Network.lose` takes its
link down first (the other nodes' connections to it go silent, no FIN, no RST), then SIGKILLs every
process in its namespace by PID (``ip netns pids``), then deletes the namespace. :meth:`Network.close`
does that for every host still up and deletes the bridge; it is safe to call twice, and from a finalizer
after a failure. Nothing is ever killed by name.

Needs root and iproute2 with ``ip netns`` (:func:`unavailable` says why not, for a skip).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], text=True, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why this machine cannot make hosts from namespaces (None: it can), tried for real: a namespace
    with a veth pair is made and deleted."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    name, veth = f"stkd-probe-{uuid.uuid4().hex[:6]}", f"skp{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"cannot make a network namespace with a veth pair here: {e}"
    finally:
        ip("link", "del", veth, check=False)
        ip("netns", "del", name, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no address or route of the root namespace overlaps."""
    used = []
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines() + ip("-4", "route", "show").stdout.splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word[:1].isdigit():
                    used.append(ipaddress.ip_network(word, strict=False))
    for _ in range(200):
        subnet = ipaddress.ip_network(f"10.{random.randrange(100, 250)}.{random.randrange(1, 255)}.0/24")
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise RuntimeError("no free /24 in 10.100.0.0 - 10.249.255.0")


@dataclass
class Host:
    """One namespace: its name, address, the bridge end of its veth pair, and the processes started in it."""

    label: str
    netns: str
    address: str
    veth: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    lost: bool = False


class Network:
    def __init__(self, folder: Path):
        self.folder = folder
        self.tag = uuid.uuid4().hex[:5]
        self.subnet = free_subnet()
        self.addresses = iter(self.subnet.hosts())
        self.gateway = str(next(self.addresses))
        self.bridge = f"sk{self.tag}br"
        self.hosts: list[Host] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def host(self, label: str) -> Host:
        """A new host on the bridge, with the next free address."""
        index = len(self.hosts)
        host = Host(label, f"stkd-{self.tag}-{label}", str(next(self.addresses)), f"sk{self.tag}h{index}")
        self.hosts.append(host)  # before it exists: close() removes what a failed set-up left
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def start(self, host: Host, argv: list[str], env: dict[str, str], log_name: str,
              cwd: Path | None = None) -> subprocess.Popen:
        """``argv`` in ``host``'s namespace (``ip netns exec``, which execs it: the PID is the command's),
        output to ``folder/log_name``."""
        log = open(self.folder / log_name, "w")
        proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], env=env, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        host.processes.append(proc)
        return proc

    def run(self, host: Host, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """``argv`` in ``host``'s namespace, to its end."""
        return subprocess.run(["ip", "netns", "exec", host.netns, *argv], env=env, text=True, capture_output=True,
                              timeout=timeout)

    @staticmethod
    def pids(host: Host) -> list[int]:
        out = ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def cut(self, host: Host) -> None:
        """Take the host's link down at the bridge: from now on the others hear nothing from it."""
        ip("link", "set", host.veth, "down")

    def kill(self, host: Host) -> list[int]:
        """SIGKILL every process in the host's namespace, by PID, until none is left; returns them."""
        killed: list[int] = []
        deadline = time.monotonic() + 30
        while True:
            for proc in host.processes:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        proc.kill()
            left = [pid for pid in self.pids(host) if not zombie(pid)]
            if not left:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of {host.netns} outlived SIGKILL for 30 s: {left}")
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)
        for proc in host.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        return sorted(set(killed))

    def remove(self, host: Host) -> None:
        """The host's processes killed, its namespace and veth pair deleted."""
        if ip("netns", "list").stdout.split().count(host.netns):
            self.kill(host)
            ip("netns", "del", host.netns, check=False)
        ip("link", "del", host.veth, check=False)  # usually gone with the namespace's end
        host.lost = True

    def lose(self, host: Host) -> list[int]:
        """A host's failure: link down, every process killed, namespace deleted. Returns the PIDs killed."""
        self.cut(host)
        killed = self.kill(host)
        self.remove(host)
        return killed

    def close(self) -> None:
        """Every host removed (its processes first), then the bridge."""
        errors = []
        for host in reversed(self.hosts):
            if not host.lost:
                try:
                    self.remove(host)
                except Exception as e:  # go on: the others still have to go
                    errors.append(f"{host.netns}: {e}")
        ip("link", "del", self.bridge, check=False)
        if errors:
            raise RuntimeError("could not remove every host: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network still on the machine (none after close())."""
        names = [n for n in ip("netns", "list").stdout.split() if n.startswith(f"stkd-{self.tag}-")]
        links = [w.split("@")[0].rstrip(":") for w in ip("-o", "link", "show").stdout.split()
                 if w.startswith(f"sk{self.tag}")]
        return names + links


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone
