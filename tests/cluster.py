"""A local Redis Cluster for the tests: three masters and three replicas, no Docker.

The nodes are `redis-server` processes on free ports, each in its own directory; the
cluster is formed with `redis-cli --cluster create`. Fixtures: `redis_cluster` (one
cluster for the whole session) and `private_redis_cluster` (one per test, for tests that
kill nodes). Register them with `pytest_plugins = ["tests.cluster"]`.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

HOST = "127.0.0.1"
SLOTS = 16384
BUS_OFFSET = 10000  # the cluster bus listens on port + 10000
MISSING = (
    "redis-server and redis-cli are needed for the Redis Cluster tests: "
    "install the Debian redis-server package"
)


class ClusterError(RuntimeError):
    """The local cluster did not start or did not reach the expected state."""


def cluster_available() -> bool:
    """Whether the `redis-server` and `redis-cli` binaries are on PATH."""
    return bool(shutil.which("redis-server") and shutil.which("redis-cli"))


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL the server if the test process dies (Linux)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


class LocalCluster:
    """Three masters with one replica each, on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.size = masters * (1 + replicas)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.base_dir = Path()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._url_port = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start the nodes, form the cluster, wait until it is whole and replicated."""
        if not cluster_available():
            raise ClusterError(MISSING)
        self.base_dir = Path(tempfile.mkdtemp(prefix="usermgmt-cluster-"))
        atexit.register(self.stop)
        try:
            for _ in range(self.size):
                self._start_node()
            self._create()
            self._wait(self._whole, timeout, "the cluster to be whole")
            self._url_port = min(self.masters())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every node and remove the directories. Safe to call twice."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self._procs.clear()
        if self.base_dir != Path():
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = Path()
        atexit.unregister(self.stop)

    def kill(self, port: int) -> None:
        """SIGKILL one node (its directory and nodes.conf stay, for `restart`)."""
        proc = self._procs[port]
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a killed node again on its port; it rejoins (as a replica if it lost its slots)."""
        if self.alive(port):
            raise ClusterError(f"node {port} is still running")
        proc = self._spawn(port)
        if not self._wait_up(port, proc):
            proc.kill()
            raise ClusterError(f"node {port} did not restart: {self._log_tail(port)}")
        self._procs[port] = proc
        addr = f"{HOST}:{port}"

        def rejoined() -> bool:
            for live in self.live_ports():
                flags = self._cmd(live, "CLUSTER NODES")[addr]["flags"].split(",")
                if not self._node_ok(live) or {"fail", "fail?"} & set(flags):
                    return False
            return True

        self._wait(rejoined, timeout, f"node {port} to rejoin")

    def wait_failover(self, old_master_port: int, timeout: float = 30) -> None:
        """Wait until a replica owns the old master's slots and every live node says ok."""
        old = f"{HOST}:{old_master_port}"

        def done() -> bool:
            for port in self.live_ports():
                info = self._cmd(port, "CLUSTER INFO")
                nodes = self._cmd(port, "CLUSTER NODES")
                if info.get("cluster_state") != "ok" or nodes.get(old, {}).get("slots"):
                    return False
            return True

        self._wait(done, timeout, f"a replica to take over from {old_master_port}")

    # -- topology --------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's port, live or killed."""
        return sorted(self._procs)

    @property
    def url(self) -> str:
        """The URL of one master (the lowest master port at start); point the code here."""
        return f"redis://{HOST}:{self._url_port}/0"

    def alive(self, port: int) -> bool:
        return port in self._procs and self._procs[port].poll() is None

    def live_ports(self) -> list[int]:
        return [port for port in self.ports if self.alive(port)]

    def masters(self) -> list[int]:
        """Ports of the live nodes that are masters now (as a live node sees it)."""
        nodes = self._cmd(self.live_ports()[0], "CLUSTER NODES")
        ports = [
            int(addr.rsplit(":", 1)[1])
            for addr, node in nodes.items()
            if "master" in node["flags"].split(",")
        ]
        return sorted(port for port in ports if self.alive(port))

    def master_of(self, key: str) -> int:
        """The port of the master owning the key's slot."""
        port = self.live_ports()[0]
        slot = int(self._cmd(port, "CLUSTER KEYSLOT", key))
        nodes = self._cmd(port, "CLUSTER NODES")
        for addr, node in nodes.items():
            flags = node["flags"].split(",")
            if "master" not in flags or "fail" in flags:
                continue
            for first, *last in node["slots"]:
                if int(first) <= slot <= int(last[0] if last else first):
                    return int(addr.rsplit(":", 1)[1])
        raise ClusterError(f"no live master owns slot {slot}")

    # -- internals -------------------------------------------------------------------

    def _cmd(self, port: int, *args: Any) -> Any:
        """One command on one node (redis-py parses CLUSTER INFO / NODES into dicts)."""
        with redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2) as client:
            return client.execute_command(*args)

    def _free_port(self) -> int:
        """A port free together with its bus port, clear of the nodes' ports."""
        taken = {p + offset for p in self._procs for offset in (0, BUS_OFFSET)}
        for _ in range(100):
            with socket.socket() as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            bus = port + BUS_OFFSET
            if bus <= 65535 and not {port, bus} & taken and _bindable(bus):
                return port
        raise ClusterError("found no free port pair (port, port + 10000)")

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.base_dir / f"node-{port}"
        node_dir.mkdir(exist_ok=True)
        args = [
            "redis-server",
            *("--port", str(port), "--bind", HOST, "--daemonize", "no"),
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(self.node_timeout_ms)),
            *("--appendonly", "no", "--save", "", "--dir", str(node_dir)),
            *("--repl-diskless-sync-delay", "0"),  # the default 5 s delays every replica
        ]
        with open(node_dir / "redis.log", "ab") as log:
            return subprocess.Popen(
                args,
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads of ours here)
            )

    def _wait_up(self, port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> bool:
        """Until the node answers as this process; False if it exited (port taken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if self._cmd(port, "INFO", "server")["process_id"] == proc.pid:
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.01)
        return False

    def _start_node(self) -> None:
        for _ in range(5):  # another process may grab a port between the check and the bind
            port = self._free_port()
            proc = self._spawn(port)
            if self._wait_up(port, proc):
                self._procs[port] = proc
                return
            proc.kill()
            proc.wait()
            tail = self._log_tail(port)
            shutil.rmtree(self.base_dir / f"node-{port}", ignore_errors=True)
        raise ClusterError(f"redis-server did not start: {tail}")

    def _create(self) -> None:
        addrs = [f"{HOST}:{port}" for port in self.ports]
        replicas = ("--cluster-replicas", str(self.replicas), "--cluster-yes")
        result = subprocess.run(
            ["redis-cli", "--cluster", "create", *addrs, *replicas],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"redis-cli --cluster create failed:\n{result.stdout[-2000:]}")

    def _whole(self) -> bool:
        """Every node: state ok, all slots served, no failures, every replica linked."""
        for port in self.ports:
            if not self._node_ok(port):
                return False
            nodes = self._cmd(port, "CLUSTER NODES").values()
            flags = [set(node["flags"].split(",")) for node in nodes]
            if {"fail", "fail?"} & set().union(*flags) or len(flags) != self.size:
                return False
            if sum("master" in f for f in flags) != self.size // (1 + self.replicas):
                return False
        return True

    def _node_ok(self, port: int) -> bool:
        """The node says cluster_state:ok and, if it is a replica, master_link_status:up."""
        info = self._cmd(port, "CLUSTER INFO")
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
            return False
        repl = self._cmd(port, "INFO", "replication")
        return bool(repl["role"] == "master" or repl.get("master_link_status") == "up")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (redis.RedisError, KeyError, IndexError) as exc:
                error = exc
            time.sleep(0.05)
        raise ClusterError(f"timed out after {timeout}s waiting for {what} (last error: {error})")

    def _log_tail(self, port: int) -> str:
        log = self.base_dir / f"node-{port}" / "redis.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return " | ".join(lines[-3:])


def started_cluster() -> Iterator[LocalCluster]:
    """A started local cluster, stopped afterwards; fails (never skips) without redis-server."""
    if not cluster_available():
        pytest.fail(MISSING, pytrace=False)
    cluster = LocalCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """One started local cluster for the whole session; keep it whole (use prefixes)."""
    yield from started_cluster()


@pytest.fixture
def private_redis_cluster() -> Iterator[LocalCluster]:
    """A cluster of the test's own, for tests that kill or restart nodes (~2 s to start)."""
    yield from started_cluster()
