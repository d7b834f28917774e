"""Throw-away Redis servers for the tests: a 3-master + 3-replica cluster and a Sentinel set-up.

Each server is the installed ``redis-server`` on loopback, on free ports of its own, with nothing
on disk (``--save '' --appendonly no``; the cluster's nodes.conf and the sentinel's config live in
a temporary folder) and is stopped by its PID. Every wait polls with a deadline: a cluster that
does not form in time fails the fixture with what it saw last, never hangs the run.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
SLOTS = 16384
FORM_TIMEOUT_S = 20.0
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a dead master is replaced within a few seconds


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; a tiny race with other processes remains)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], object], timeout_s: float = FORM_TIMEOUT_S) -> None:
    """Poll ``check`` (truthy = done) every 20 ms until ``timeout_s``; fail with the last error."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not done within {timeout_s:.0f}s (last error: {last!r})")


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    args: list[str]
    bus_port: int = 0  # a cluster node's bus port (CLUSTER MEET needs it: not port + 10000 here)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2,
                           decode_responses=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, *extra: str) -> None:
        """Start again with the same arguments (a cluster node keeps its identity: nodes.conf),
        plus ``extra`` ones this time."""
        self.stop()
        self.process = subprocess.Popen([*self.args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"redis-server on port {self.port}", lambda: self.client().ping())


def start_server(folder: Path, *extra: str, port: int | None = None) -> Server:
    """One redis-server in ``folder`` (its working directory), answering PING before it returns."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder), "--daemonize", "no",
            # a replica's first sync streams at once (the default waits 5 s for more replicas)
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", *extra]
    server = Server(port, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args)
    try:
        wait_for(f"redis-server on port {port}", lambda: server.client().ping())
    except TimeoutError:
        server.stop()
        raise
    return server


def start_cluster_node(folder: Path) -> Server:
    port, bus_port = free_port(), free_port()
    server = start_server(folder / str(port), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(bus_port),
                          # as docs/operations.md advises: a master down stops only its own slots
                          "--cluster-require-full-coverage", "no",
                          port=port)
    server.bus_port = bus_port
    return server


@dataclass
class Cluster:
    masters: list[Server]
    replicas: list[Server]
    extra: list[Server] = field(default_factory=list)

    @property
    def nodes(self) -> list[Server]:
        return self.masters + self.replicas + self.extra

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.masters)

    def stop(self) -> None:
        for server in self.nodes:
            server.stop()

    def state_ok(self) -> bool:
        """Every running node sees all slots served and every master with one replica."""
        for server in self.nodes:
            if server.process.poll() is not None:
                continue
            info = server.client().cluster("info")
            if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                return False
        return True


def start_cluster(folder: Path, masters: int = 3) -> Cluster:
    """``masters`` masters sharing the slots, one replica each; returns once every node agrees."""
    cluster = Cluster([start_cluster_node(folder) for _ in range(masters)],
                      [start_cluster_node(folder) for _ in range(masters)])
    try:
        first = cluster.masters[0].client()
        step = SLOTS // masters
        for i, master in enumerate(cluster.masters):
            high = SLOTS - 1 if i == masters - 1 else (i + 1) * step - 1
            master.client().execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, high)
        for server in cluster.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port, server.bus_port)
        ids = [m.client().execute_command("CLUSTER", "MYID") for m in cluster.masters]
        # A replica can follow a master only once it knows that node (gossip after MEET).
        for replica, master_id in zip(cluster.replicas, ids, strict=True):
            client = replica.client()
            wait_for("replica learns its master", lambda c=client, m=master_id: m in c.execute_command(  # type: ignore[misc]
                "CLUSTER", "NODES"))
            client.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_for("cluster state ok on every node", cluster.state_ok)
        wait_for("replicas in sync", lambda: all(
            r.client().info("replication").get("master_link_status") == "up" for r in cluster.replicas))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelSetup:
    master: Server
    replica: Server
    sentinel: Server
    name: str = "billing"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.name}"

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


def start_sentinel(folder: Path, name: str = "billing") -> SentinelSetup:
    """One master, one replica of it, one sentinel watching them (quorum 1)."""
    master = start_server(folder / "master")
    replica = start_server(folder / "replica", "--replicaof", "127.0.0.1", str(master.port))
    config = folder / "sentinel.conf"  # a sentinel rewrites its config file: it must be writable
    port = free_port()
    config.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                      f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
                      f"sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n")
    args = [REDIS_SERVER, str(config), "--sentinel"]
    sentinel = Server(port, subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args)
    setup = SentinelSetup(master, replica, sentinel, name)
    try:
        wait_for("replica in sync", lambda: replica.client().info("replication").get("master_link_status") == "up")
        wait_for("sentinel knows the master and its replica",
                 lambda: int(sentinel.client().sentinel_master(name)["num-slaves"]) >= 1)
    except BaseException:
        setup.stop()
        raise
    return setup

