#!/usr/bin/env python3
"""Many nodes on one ledger (issue 19): N real daemons, one PostgreSQL, one Redis Cluster.

    python bench/bench_nodes.py                                   # 5 daemons x 2,000 calls, 1 s nibbles
    python bench/bench_nodes.py --calls 200 --hold-s 20           # a quick run
    python bench/bench_nodes.py --calls 200 --redis both          # the cluster, then one Redis: the ratio
    python bench/bench_nodes.py --calls 100 --cps 5 --hold-s 20 --kill-master-at 15   # a master killed -9

What runs, all on loopback and all stopped at the end:

* one scratch PostgreSQL database (``bench_overspend.scratch_database``: created on
  127.0.0.1:5432 and dropped afterwards), prepared as the demo does (schema, the demo deck:
  ``33`` at 0.60 a minute) plus ``--accounts`` bench accounts shared by every node; the first
  ``--tight-share`` of them hold only ``--tight-micros``, so their calls run out of money and
  are cut (the overspend check has something to check);
* one Redis Cluster of 3 masters + 3 replicas (``tests/redis_servers.start_cluster``), or one
  Redis (``--redis single``), from the installed ``redis-server``;
* ``--nodes`` daemons, each ``billing-agent run`` (``python -m agent.entry run``) in a process of
  its own with its own ``node.id`` (``bench1``...), status port, CDR spool and config file;
* one simulated Asterisk per daemon (``agent.sim.asterisk.FakeAsterisk`` in a child process of
  this script: the AMI server the daemon logs in to, and the FastAGI client of every call; like
  Asterisk it gives up on FastAGI after 2 s, and the dialplan then refuses the call).

The accounts are loaded into Redis before the daemons start, as a running fleet has them
(``--cold`` leaves Redis empty: see ``warm_accounts``). ``--store-timeout-ms`` sets
``billing.store_timeout_ms`` and ``redis.timeout_ms`` (250 as shipped).

Each fake PBX places ``--calls`` calls evenly over ``--calls / --cps`` seconds; every call talks
until ``--hold-s`` seconds after the last one was placed (plus up to ``--end-spread-s``), so all
are live together during the hold and end together. Figures:

* nibble debits/s across the cluster: ``billing_nibble_debits_total`` of every daemon
  (``/metrics``) read at the start and the end of the hold; the ideal is live calls / nibble;
* authorization p50/p99: from the daemons' ``billing_authorize_seconds`` histograms (merged,
  interpolated inside a bucket as Prometheus' ``histogram_quantile`` does) and as the PBX saw it
  (the fake's FastAGI session, connect to the agent's close, exact per call);
* CDRs/s into PostgreSQL: ``calls`` rows counted every 0.2 s from the end of the hold until all
  are in (the offered rate is bounded by how fast the calls end: ``--end-spread-s``; calls cut
  earlier are not in it), and the daemons' ``billing_cdr_visible_seconds`` (settle to commit)
  p50/p99;
* invariants: no account below its floor (``-credit_limit``) in SQL or in the store, no
  reservation left open (the overrun the store recorded is reported beside); every call the
  PBX saw allowed has exactly one ``calls`` row (by the call id the agent derives:
  ``{node.id}-{uniqueid}``), none twice, no row for a call not placed (a call the agent allowed
  after the PBX gave up on FastAGI has a NO ANSWER row: counted apart), no call charged twice;
  ``billing-agent ledger check --grace-seconds 0`` exits 0 (run once the daemons stopped and
  every journaled balance step was replayed);
* money: each answered call's ledger charge against its talk as the fake PBX timed it. A call
  the agent cut is billed to its money's end when the cut was sent within the backstop margin
  (1 s), so its talk past the charge is its cut delay (the money's end to the PBX's hangup);
  money lost is talk past the charge beyond that margin, on any call (expected 0).

``--redis sentinel``: one master, one replica and a Sentinel (``redis+sentinel://``); with
``--kill-master-at S`` the master is killed and the Sentinel promotes the replica
(``down-after-milliseconds`` 1 s); every account is then the dead master's.

``--kill-master-at S`` (cluster or Sentinel) kills -9 one master S seconds after the first call is
placed (``--kill-master most``: the one whose slots hold the most bench accounts; ``random``
with ``--kill-seed``); the cluster promotes its replica (``cluster-node-timeout`` 1 s). Figures:
when the replica answered as master, the outage the daemons saw (from their logs: the first
circuit the store guard opened after the kill to the last "answers again" that followed a
circuit opened before the promotion + 2 s), the calls placed, denied and cut meanwhile (on the
dead master's accounts and on the others), the cut delays and money lost of the calls cut then,
and the invariants above, after the failover.

The machine has 2 shared cores: the PBX fakes, the daemons, the Redis servers and PostgreSQL
all share them, so the figures are those of this box, not of the design.

First runs (2026-12-03, 5 daemons x 200 calls, ``--cps 5 --hold-s 20``, while two PBX builds kept
the 2 cores saturated, load average 8-10): no steady state was reached. The daemons missed the
store deadline again and again (66-89 misses a run, mostly settles and journal replays: a Redis
settle writes its ledger entries to PostgreSQL inside that deadline), each miss opened the
store circuit for a second, ``fail_closed`` cut most calls at their slice end, and nearly every
settle went through the balance journal. ``--redis both`` at the shipped 250 ms: authorization
p50 199 ms (cluster) / 65 ms (one Redis), p99 in the top bucket (>= 1 s) on both; PBX-side
FastAGI p50 868 / 124 ms, p99 2.3 / 2.0 s (calls over 2 s were refused by the fake's FastAGI
limit); nibble debits/s 0 (cluster: almost every call already cut when the hold began) / 22.8
(one Redis, 22 calls live, ideal 22); CDRs/s 11.1 (one Redis, 21 rows at the end of the hold;
settle to commit p99 3.8 s, 57 s on the cluster). Invariants on both: no account below its
floor, no CDR missing, none for a call not placed, none twice, no call charged twice, ``ledger
check`` exit 0; the cluster run left one reservation open when the daemons stopped (within its
TTL; the TTL sweep was added after), overrun recorded 1.26 (cluster) and 0.01 (one Redis).
Again once the builds had ended (another test suite still running): cluster / one Redis,
authorization p50 60 / 38 ms, p99 >= 1 s / 292 ms (PBX side p99 1.9 s / 338 ms); nibble
debits/s 23.3 / 9.4 for 23 / 12 calls still live in the hold (ideal 23 / 12; 33 / 23 deadline
misses had cut the rest); CDRs/s 17.9 / 7.4 (22 / 9 rows in 1.2 s); every CDR once and ``ledger
check`` OK on both, but on one Redis 2 tight accounts ended at -0.01 (one second of talk
past their money; overrun recorded 0.08).
``--store-timeout-ms 400`` (cluster): the same picture (68 misses), invariants OK with a TTL
sweep, overrun 5.77. ``--nibble-ms 6000`` (cluster, 250 ms): authorization p50 37 ms, p99
247 ms; 33 misses, 849 of 883 settles journaled; invariants OK, overrun 0.
``--store-timeout-ms 2000`` (cluster): 10 of the 10 tight accounts ended below their floor
(lowest -0.08): a deadline past half a nibble is known only after the slice it should pay
began. The ``ERROR ... no ? switch to carry HangupLeg`` lines of those logs are
cuts queued for calls that had already ended.

After the three fixes (ledger posts off the deadline, the per-slot sweeper index, a cut late
within the margin billed to the money's end), 2026-12-03, 1-minute load 2.6-3.8 from the runs
themselves, medians of 3 runs, cluster / one Redis:
``--calls 100 --cps 5 --hold-s 20 --redis both`` (500 live calls): nibble debits/s 288 (ideal
290) / 499 (500); authorization p50/p99 61/417 ms / 36/192 ms (PBX side 67/373 / 37/144);
CDRs/s 199 / 292; deadline misses 12-21 / 5-8 a run. ``--calls 200 --cps 10`` (1,000 live):
393 (394; runs 98, 593, 393) / 733 (849; runs 733, 893 and 2: every call cut); p50/p99 34/273 /
23/175 ms; CDRs/s 184 / 403. Every invariant held in all 12 runs (money lost 0). On the
cluster 77 of the 132 circuits opened were the sweeper's (``expire: no answer within 250 ms``:
its read of 16,384 slot indexes runs inside the store deadline, in step on the five daemons),
on one Redis 14 of 53; each daemon also missed the deadline on ``live calls`` at its start on
the cluster.
``--redis cluster --calls 100 --cps 5 --hold-s 20 --kill-master-at 15`` (6 runs, load 1.3-5.4:
the master of 40 accounts five times, twice drawn by ``random``, once at ``--calls 60 --cps 3``;
a master of 32 accounts once, ``--kill-master random --kill-seed 5``): replica promoted 2.0-2.5 s
after the kill; outage seen by all 5 daemons 3.4-4.6 s; 48-109 calls denied and 185-382 cut
meanwhile (every call then live), 28-49 and 112-252 of them on the other masters' accounts (one
circuit per daemon, one pipeline per nibble batch, one ordered journal: agent/services/store_guard.py);
longest cut delay 31-144 ms, money lost 0, after: ledger check OK, no account below its floor,
no call charged twice.
The same after the guard got a circuit per master and the clusters ``cluster-require-full-coverage
no`` (2026-12-04, 3 runs, load 0.6-1.2, the master of 40 accounts): 5 circuits a run, all the dead
master's; replica promoted 2.5-2.7 s after the kill; on the other masters' accounts 0 calls denied
and 0 cut (the dead master's: 39-45 denied, 135 cut); longest cut delay 15-34 ms, money lost 0,
every invariant held.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.redis_servers starts the servers

from bench_overspend import scratch_database  # a PostgreSQL database of its own, and its drop

AMI_SECRET = "bench-secret"
DESTINATION_PREFIX = "3314"  # the demo deck's France: 0.60 a minute = 10,000 micro-units a second
ANSWER_AFTER_MS = 100
HEALTH_TIMEOUT_S = 90.0
TAIL_TIMEOUT_S = 120.0  # after the hold: every call ended and every CDR in SQL within this


# ------------------------------------------------------------------ pure helpers


def account_of(node_index: int, call_index: int, calls: int, accounts: int) -> str:
    """The account of a node's call: every node's calls spread over all accounts (shared balances)."""
    return f"acct{(node_index * calls + call_index) % accounts}"


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric_sum(scrapes: Iterable[dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str,
               **labels: str) -> float:
    """Sum of one sample over every node (and over the labels not given)."""
    total = 0.0
    for scrape in scrapes:
        for (sample, sample_labels), value in scrape.items():
            if sample == name and all((k, v) in sample_labels for k, v in labels.items()):
                total += value
    return total


def merged_buckets(scrapes: Iterable[dict[tuple[str, tuple[tuple[str, str], ...]], float]],
                   histogram: str) -> list[tuple[float, float]]:
    """The cumulative buckets of one histogram summed over every node: [(upper bound, count)]."""
    counts: dict[float, float] = {}
    for scrape in scrapes:
        for (sample, labels), value in scrape.items():
            if sample == f"{histogram}_bucket":
                bound = float(dict(labels)["le"])
                counts[bound] = counts.get(bound, 0.0) + value
    return sorted(counts.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket that holds the rank; a rank
    in the +Inf bucket gives the highest finite bound (the true value is above it)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of raw values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def cdr_rate(samples: list[tuple[float, int]]) -> tuple[float | None, float | None, int]:
    """From (time, rows) samples: rows/s from the last sample before the count first rose to
    the first sample at the final count, that span in seconds, and the rows written in it.
    (None, None, 0) when the count never rose."""
    start = next((i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]), None)
    if start is None:
        return None, None, 0
    final = samples[-1][1]
    t0, rows0 = samples[start - 1]
    done = next(t for t, rows in samples[start:] if rows >= final)
    span = done - t0
    return ((final - rows0) / span if span > 0 else None), span, final - rows0


# ------------------------------------------------------------------ the simulated PBX (child process)


def pbx_child(spec: dict[str, Any]) -> None:
    """One fake Asterisk: AMI on ``ami_port``, calls to the agent's FastAGI on ``agi_port``.
    Talks on stdout (one JSON line per step) and reads "go <epoch>" then "stop" on stdin;
    its results go to ``spec["out"]`` (too big for a pipe the parent does not read meanwhile)."""
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from agent.sim.asterisk import FakeAsterisk, FakeCall, FakeChannel

    class TimedAsterisk(FakeAsterisk):
        """Times each FastAGI session (connect to the agent's close): what the dialplan waits."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.agi_ms: list[float] = []

        def _agi(self, call: FakeCall, a: FakeChannel) -> str:
            began = time.perf_counter()
            try:
                return super()._agi(call, a)
            finally:
                self.agi_ms.append((time.perf_counter() - began) * 1000)

    fake = TimedAsterisk("127.0.0.1", spec["agi_port"], ami_port=spec["ami_port"], ami_username="billing",
                         ami_secret=AMI_SECRET, seed=spec["index"])
    fake.start()
    print(json.dumps({"listening": fake.ami_port}), flush=True)
    while fake.live_sessions() == 0:
        gevent.sleep(0.05)
    print(json.dumps({"logged_in": True}), flush=True)
    # stdin is read in a native thread: a plain read would block the hub, and with it the AMI
    # session the daemon is still setting up (its login then times out, again and again).
    read_line = gevent.get_hub().threadpool.apply
    command = read_line(sys.stdin.readline).split()
    if not command or command[0] != "go":
        fake.stop()
        return
    go, calls, cps = float(command[1]), int(spec["calls"]), float(spec["cps"])
    ramp_s = calls / cps
    end_at = go + ramp_s + float(spec["hold_s"])
    rng = random.Random(spec["index"])
    gevent.sleep(max(0.0, go - time.time()))
    handles = []
    placed_at: list[float] = []
    for k in range(calls):
        due = go + k / cps
        if due > time.time():
            gevent.sleep(due - time.time())
        talk_ms = int((end_at + rng.uniform(0, float(spec["end_spread_s"])) - time.time()) * 1000) - ANSWER_AFTER_MS
        account = account_of(spec["index"], k, calls, spec["accounts"])
        placed_at.append(time.time())
        handles.append(fake.place_call(account, f"{DESTINATION_PREFIX}{k:07d}", caller=f"{2000 + k}",
                                       answer_after_ms=ANSWER_AFTER_MS, talk_ms=max(1000, talk_ms)))
    placed_s = time.time() - go
    idle = fake.wait_idle(max(0.0, end_at - time.time()) + float(spec["end_spread_s"]) + TAIL_TIMEOUT_S)
    result = {
        "index": spec["index"], "placed": len(handles), "placing_s": placed_s, "all_ended": idle,
        "outcomes": dict(Counter(h.outcome or "unfinished" for h in handles)),
        "reasons": dict(Counter(h.reason for h in handles if h.decision != "allow")),
        "allowed": [h.a_uniqueid for h in handles if h.decision == "allow"],
        "placed_ids": [h.a_uniqueid for h in handles if h.a_uniqueid],
        "agi_ms": fake.agi_ms,
        # one row per call, for the failover report: what the PBX saw and when (epoch s / ms)
        "calls": [[h.a_uniqueid, h.account, round(at, 3), h.decision, h.reason, h.outcome, h.cut_by,
                   h.answered_ms, h.ended_ms] for h, at in zip(handles, placed_at, strict=True)],
    }
    Path(spec["out"]).write_text(json.dumps(result))
    print(json.dumps({"done": True}), flush=True)
    read_line(sys.stdin.readline)  # "stop" (or EOF): the daemon is stopped first, so its AMI link never drops
    fake.stop()


# ------------------------------------------------------------------ one node: fake PBX + daemon


@dataclass
class Node:
    index: int
    folder: Path
    agi_port: int
    ami_port: int
    status_port: int
    pbx: subprocess.Popen[str] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    daemon_log: TextIO | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return f"bench{self.index + 1}"

    @property
    def config_path(self) -> Path:
        return self.folder / "agent.yaml"

    def pbx_line(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
        """The fake PBX's next JSON line (its stdout carries nothing else)."""
        assert self.pbx is not None and self.pbx.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.pbx.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise TimeoutError(f"node {self.node_id}: the fake PBX said nothing for {timeout_s:.0f} s")
        line = self.pbx.stdout.readline()
        if not line:
            raise RuntimeError(f"node {self.node_id}: the fake PBX exited (code {self.pbx.wait()})")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def tell_pbx(self, text: str) -> None:
        assert self.pbx is not None and self.pbx.stdin is not None
        self.pbx.stdin.write(text + "\n")
        self.pbx.stdin.flush()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/metrics", timeout=10) as answer:
            return parse_metrics(answer.read().decode())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


def write_config(node: Node, database_url: str, redis_url: str, args: argparse.Namespace) -> None:
    """The node's agent.yaml: its own node.id, ports and spool; the shared database and Redis."""
    import yaml

    config = {
        "database": {"url": database_url, "pool_size": args.db_pool},
        "redis": {"url": redis_url, "timeout_ms": args.store_timeout_ms},
        "node": {"id": node.node_id},
        "billing": {"nibble_seconds": args.nibble_ms // 1000, "store_timeout_ms": args.store_timeout_ms},
        "daemon": {"drain_seconds": 5.0},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": node.status_port},
        "cdr": {"spool_dir": str(node.folder / "spool")},
        "asterisk": {"enabled": True, "agi_host": "127.0.0.1", "agi_port": node.agi_port, "ami_host": "127.0.0.1",
                     "ami_port": node.ami_port, "ami_username": "billing", "ami_secret": AMI_SECRET},
        "logging": {"level": args.log_level},  # info: a line per authorization, CPU the calls need
    }
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def agent_command(config: Path, *args: str) -> list[str]:
    """``billing-agent --config FILE ...`` (the console script is ``agent.entry:main``)."""
    return [sys.executable, "-m", "agent.entry", "--config", str(config), *args]


# ------------------------------------------------------------------ a cluster master killed -9 mid-run


@dataclass
class MasterKill:
    """Kills one master of the cluster with SIGKILL ``at_s`` seconds after the first call is placed
    (a thread of this script); its replica is promoted by the cluster itself (``cluster-node-timeout``
    1 s in tests/redis_servers.py, then an election). ``how``: ``most`` is the master owning the
    slots of the most bench accounts, ``random`` any master (seeded)."""

    at_s: float
    how: str
    accounts: int
    seed: int = 0
    victim_port: int = 0
    replica_port: int = 0
    victim_accounts: list[str] = field(default_factory=list)
    killed_at: float = 0.0  # epoch s
    promoted_at: float = 0.0  # epoch s: the replica says master and its cluster_state is ok
    error: str = ""
    thread: threading.Thread | None = None

    def start(self, cluster: Any, go: float) -> None:
        self.thread = threading.Thread(target=self._run, args=(cluster, go), daemon=True)
        self.thread.start()

    def _run(self, cluster: Any, go: float) -> None:
        from redis.crc import key_slot

        if hasattr(cluster, "sentinel"):
            self._run_sentinel(cluster, go)
            return
        try:
            slots: dict[int, int] = {}  # master port -> how many bench accounts its slots hold
            owners = cluster.masters[0].client().execute_command("CLUSTER", "SLOTS")
            ranges = [(int(r[0]), int(r[1]), int(r[2][1])) for r in owners]
            by_port: dict[int, list[str]] = {m.port: [] for m in cluster.masters}
            for i in range(self.accounts):
                slot = key_slot(f"{{acct{i}}}".encode())  # every key of the account carries {ID}
                port = next(p for lo, hi, p in ranges if lo <= slot <= hi)
                by_port[port].append(f"acct{i}")
            slots = {port: len(names) for port, names in by_port.items()}
            if self.how == "most":
                victim = max(cluster.masters, key=lambda m: slots[m.port])
            else:
                victim = random.Random(self.seed).choice(cluster.masters)
            replica = next(r for r in cluster.replicas
                           if int(r.client().execute_command("ROLE")[2]) == victim.port)
            self.victim_port, self.replica_port = victim.port, replica.port
            self.victim_accounts = by_port[victim.port]
            time.sleep(max(0.0, go + self.at_s - time.time()))
            victim.process.kill()  # SIGKILL
            self.killed_at = time.time()
            victim.process.wait(timeout=10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    client = replica.client()
                    if (client.execute_command("ROLE")[0] == "master"
                            and client.cluster("info")["cluster_state"] == "ok"):
                        self.promoted_at = time.time()
                        return
                except Exception:  # noqa: BLE001 - a node busy electing answers late, or not at all
                    pass
                time.sleep(0.02)
            self.error = "the replica was not promoted within 60 s"
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.error = repr(exc)


    def _run_sentinel(self, setup: Any, go: float) -> None:
        """Sentinel: the one master holds every account; its replica is promoted by the Sentinel
        (``down-after-milliseconds`` 1 s in tests/redis_servers.py, then its failover)."""
        try:
            victim, replica = setup.master, setup.replica
            self.victim_port, self.replica_port = victim.port, replica.port
            self.victim_accounts = [f"acct{i}" for i in range(self.accounts)]
            time.sleep(max(0.0, go + self.at_s - time.time()))
            victim.process.kill()  # SIGKILL
            self.killed_at = time.time()
            victim.process.wait(timeout=10)
            sentinel = setup.sentinel.client()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    named = sentinel.sentinel_get_master_addr_by_name(setup.name)
                    if (named is not None and int(named[1]) == replica.port
                            and replica.client().execute_command("ROLE")[0] == "master"):
                        self.promoted_at = time.time()
                        return
                except Exception:  # noqa: BLE001 - a failover in progress answers late
                    pass
                time.sleep(0.02)
            self.error = "the Sentinel did not promote the replica within 60 s"
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.error = repr(exc)


LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"  # the daemon's plain log lines (agent.daemon: asctime)


REBUILD_LINE = re.compile(r"has a new replication id \S+ .*?: (?P<accounts>\d+) accounts changed")
CIRCUIT_LINE = re.compile(r"balance store(?: \(master (?P<master>[^)]+)\))? "
                          r"(?:(?P<down>unavailable during )|(?P<up>answers again ))(?P<what>.*)")


def store_events(node: Node) -> list[tuple[float, str, str, str]]:
    """The StoreGuard's circuits in a daemon's log: (epoch s, "down" | "up", the step and
    reason, the cluster master it names or ""). "down" is logged when a circuit opens (a
    deadline missed or an error), "up" when a step answers again; the steps refused while it is
    open are not logged. One circuit per cluster master (store_guard.py)."""
    events = []
    for line in (node.folder / "daemon.log").read_text(errors="replace").splitlines():
        found = CIRCUIT_LINE.search(line)
        if found is None:
            continue
        try:
            at = datetime.strptime(line[:23], LOG_TIME_FORMAT).timestamp()  # local time, as logged
        except ValueError:
            continue
        events.append((at, "down" if found["down"] else "up", found["what"], found["master"] or ""))
    return events


def call_rows(nodes: list[Node]) -> list[dict[str, Any]]:
    """Every call the fake PBXes placed, with the agent's call id."""
    from agent.services.engine import CALL_ID_UNSAFE

    rows = []
    for n in nodes:
        for uid, account, placed, decision, reason, outcome, cut_by, answered_ms, ended_ms in n.result["calls"]:
            rows.append({"id": CALL_ID_UNSAFE.sub("_", f"{n.node_id}-{uid}")[:64], "account": account,
                         "placed": placed, "decision": decision, "reason": reason, "outcome": outcome,
                         "cut_by": cut_by, "answered_ms": answered_ms, "ended_ms": ended_ms,
                         "talk_ms": max(0.0, ended_ms - answered_ms) if answered_ms and ended_ms else 0.0})
    return rows


def money_figures(rows: list[dict[str, Any]], charges: dict[str, int], tight: int,
                  margin_ms: int = 1000) -> dict[str, Any]:
    """Each answered call's charge in the ledger against its talk as the PBX timed it (answer to
    hangup; the deck's 0.60 a minute in 1/1 s increments: 10 micro-units a millisecond).

    A call the agent cut is billed to the end of its money when the cut was sent within the backstop
    margin (``margin_ms``, 1 s: session.py ``cut_lateness_free_ms``), so its talk past the charge
    is the cut's delay (money exhausted to the PBX's hangup); past the margin the talk is charged.
    A call its caller ended is charged at least its talk, unless the agent's cut raced the caller's
    hangup (the PBX saw the caller leave first, the agent billed its cut: to the money's end), so
    ``undercharged`` calls within the margin are such races. ``money_lost_micros``: talk past
    the charge beyond the margin, cut or not (expected 0)."""
    per_ms = 10
    undercharged = undercharged_calls = lost_cut = lost_uncut = given = 0
    cut_delays = []
    under_ms: list[float] = []  # PBX talk minus the talk charged, of the undercharged calls
    under: list[dict[str, Any]] = []
    for r in rows:
        if not r["answered_ms"] or not r["ended_ms"]:
            continue
        charged = charges.get(r["id"], 0)
        if r["outcome"] == "cut":
            delay = r["talk_ms"] - charged / per_ms
            cut_delays.append((delay, r))
            given += int(min(max(0.0, delay), margin_ms) * per_ms)
            lost_cut += int(max(0.0, delay - margin_ms) * per_ms)
        else:
            due = math.ceil(r["talk_ms"] / 1000 - 1e-6) * 1000 * per_ms
            if charged < due:
                undercharged += due - charged
                undercharged_calls += 1
                lost_uncut += int(max(0.0, r["talk_ms"] - charged / per_ms - margin_ms) * per_ms)
                under_ms.append(r["talk_ms"] - charged / per_ms)
                under.append({"call": r["id"], "account": r["account"], "talk_ms": round(r["talk_ms"], 1),
                              "charged_micros": charged})
    longest = max(cut_delays, key=lambda d: d[0], default=None)
    return {
        "answered_calls": sum(1 for r in rows if r["answered_ms"]),
        "undercharged_calls": undercharged_calls, "undercharged_micros": undercharged,
        "undercharged_most_ms": round(max(under_ms), 1) if under_ms else None,
        "undercharged_tight_accounts": sum(1 for u in under if int(u["account"][4:]) < tight),
        "undercharged_examples": sorted(under, key=lambda u: -u["talk_ms"] + u["charged_micros"] / per_ms)[:5],
        "cut_calls": len(cut_delays),
        "cut_calls_tight_accounts": sum(1 for _, r in cut_delays if int(r["account"][4:]) < tight),
        "cut_by_pbx_backstop": sum(1 for _, r in cut_delays if r["cut_by"] == "backstop"),
        "cut_delay_p50_ms": rounded(quantile([d for d, _ in cut_delays], 0.5), 1.0, 1),
        "cut_delay_p99_ms": rounded(quantile([d for d, _ in cut_delays], 0.99), 1.0, 1),
        "longest_cut_delay_ms": round(longest[0], 1) if longest else None,
        "longest_cut_delay_call": longest[1]["id"] if longest else None,
        "cut_delays_over_margin": sum(1 for d, _ in cut_delays if d > margin_ms),
        "cut_delay_not_charged_micros": given,
        "money_lost_micros": lost_uncut + lost_cut,
    }


def failover_figures(kill: MasterKill, nodes: list[Node], rows: list[dict[str, Any]],
                     charges: dict[str, int], tight: int) -> dict[str, Any]:
    """What the daemons saw of the master's death: their store circuits from the kill on, the
    calls refused and cut meanwhile (on the dead master's accounts and on the others), and the
    cut delays of the calls cut then."""
    if not kill.killed_at:
        return {"error": kill.error or "no master was killed (the run ended first?)"}
    k = kill.killed_at
    events = sorted((at, kind, what, n.node_id, master) for n in nodes for at, kind, what, master in store_events(n))
    before = [e for e in events if e[0] < k and e[1] == "down"]
    downs = [e for e in events if e[0] >= k and e[1] == "down"]
    # The outage: from the first circuit opened after the kill to the last "answers again" that
    # follows a circuit opened before the promotion was seen (plus 2 s for the clients to learn
    # the new slot map); circuits opened later are deadline misses of a busy box, listed apart.
    horizon = (kill.promoted_at or k) + 2.0
    outage_downs = [e for e in downs if e[0] <= horizon]
    last_down = max((e[0] for e in outage_downs), default=None)
    last_up = None
    if last_down is not None:
        for node in nodes:  # each node's first "up" after its own last circuit of the outage
            mine = [e for e in events if e[3] == node.node_id]
            node_last = max((e[0] for e in mine if e[1] == "down" and k <= e[0] <= horizon), default=None)
            if node_last is None:
                continue
            up = next((e[0] for e in mine if e[1] == "up" and e[0] >= node_last), None)
            if up is not None and (last_up is None or up > last_up):
                last_up = up
    first = outage_downs[0][0] if outage_downs else None
    end = last_up or last_down or k
    victim = set(kill.victim_accounts)

    def split(selected: list[dict[str, Any]]) -> dict[str, int]:
        return {"dead_master_accounts": sum(1 for r in selected if r["account"] in victim),
                "other_accounts": sum(1 for r in selected if r["account"] not in victim)}

    denied = [r for r in rows if k <= r["placed"] <= end and r["outcome"] == "denied"]
    placed = [r for r in rows if k <= r["placed"] <= end]
    cut = [r for r in rows if r["outcome"] == "cut" and k * 1000 <= r["ended_ms"] <= (end + 2) * 1000]
    denied_before = [r for r in rows if r["placed"] < k and r["outcome"] == "denied"]
    return {
        "victim_port": kill.victim_port, "victim_accounts": len(victim), "error": kill.error or None,
        "killed_at_s_after_go": None,  # filled by measure
        "replica_promoted_after_s": round(kill.promoted_at - k, 2) if kill.promoted_at else None,
        "outage_first_unavailable_after_kill_s": round(first - k, 2) if first is not None else None,
        "outage_last_answers_again_after_kill_s": round(end - k, 2) if first is not None else None,
        "outage_s": round(end - first, 2) if first is not None else None,
        "circuits_opened_in_outage": len(outage_downs),
        "circuits_opened_in_outage_by_step": dict(Counter(e[2].split(":")[0] for e in outage_downs)),
        "circuit_reasons_in_outage": dict(Counter(e[2].split(": ", 1)[-1].split(";")[0][:80]
                                                  for e in outage_downs)),
        "nodes_that_saw_it": len({e[3] for e in outage_downs}),
        "circuits_opened_in_outage_by_master": dict(Counter(
            "the dead master" if e[4].rpartition(":")[2] == str(kill.victim_port) else (e[4] or "whole store")
            for e in outage_downs)),
        "circuits_opened_before_kill": len(before), "circuits_opened_after_outage": len(downs) - len(outage_downs),
        "calls_placed_in_outage": split(placed),
        "calls_denied_in_outage": split(denied),
        "calls_denied_before_kill": len(denied_before),
        "calls_cut_in_outage": split(cut),
        "calls_cut_in_outage_tight": sum(1 for r in cut if int(r["account"][4:]) < tight),
        "cut_in_outage": money_figures(cut, charges, tight),
    }


# ------------------------------------------------------------------ one run


def prepare_ledger(url: str, folder: Path, args: argparse.Namespace) -> None:
    from agent.adapters.sql.accounts import create_account
    from agent.adapters.sql.engine import session_factory, transaction
    from agent.cli.demo import PLAN, prepare_database

    engine = prepare_database(url, folder)  # schema, the demo deck and plans
    tight = int(args.accounts * args.tight_share)
    with transaction(session_factory(engine)) as session:
        for i in range(args.accounts):
            create_account(session, f"acct{i}", plan=PLAN,
                           balance_micros=args.tight_micros if i < tight else 10**12)
    engine.dispose()


def warm_accounts(database_url: str, redis_url: str, accounts: int) -> None:
    """Load every account into Redis now, as a running fleet has them. Cold, the first step of
    each account loads it from SQL inside the store deadline (``billing.store_timeout_ms``): on a
    busy machine that load misses it, the circuit opens for a second, and the calls of that
    second are refused ``store_unavailable`` (``--cold`` shows it)."""
    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql.engine import make_engine, session_factory

    engine = make_engine(database_url, pool_size=1)
    store = RedisBalanceStore(make_client(redis_url, 5000), session_factory(engine))
    try:
        for i in range(accounts):
            store.account_state(f"acct{i}")
    finally:
        store.close()
        engine.dispose()


def run_once(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    from tests.redis_servers import free_port, start_cluster, start_sentinel, start_server

    folder = Path(tempfile.mkdtemp(prefix=f"bench-nodes-{kind}-"))
    database_url, drop = scratch_database()
    servers: Any = None
    nodes: list[Node] = []
    try:
        prepare_ledger(database_url, folder, args)
        if kind == "cluster":
            servers = start_cluster(folder / "redis")
            redis_url = servers.url
        elif kind == "sentinel":  # one master, one replica, a Sentinel (quorum 1)
            servers = start_sentinel(folder / "redis")
            redis_url = servers.url
        else:
            servers = start_server(folder / "redis")
            redis_url = f"redis://127.0.0.1:{servers.port}/0"
        if not args.cold:
            warm_accounts(database_url, redis_url, args.accounts)
        nodes = [Node(i, folder / f"node{i + 1}", free_port(), free_port(), free_port()) for i in range(args.nodes)]
        for node in nodes:  # every fake PBX, then every daemon, then wait for all: the starts overlap
            node.folder.mkdir(parents=True)
            write_config(node, database_url, redis_url, args)
            spec = {"index": node.index, "agi_port": node.agi_port, "ami_port": node.ami_port, "calls": args.calls,
                    "cps": args.cps, "hold_s": args.hold_s, "end_spread_s": args.end_spread_s,
                    "accounts": args.accounts, "out": str(node.folder / "pbx-result.json")}
            node.pbx = subprocess.Popen([sys.executable, __file__, "--pbx-child", json.dumps(spec)], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=node.folder)
        for node in nodes:
            node.pbx_line()  # AMI listening: the daemon can log in
            node.daemon_log = (node.folder / "daemon.log").open("w")
            node.daemon = subprocess.Popen(agent_command(node.config_path, "run"), stdout=node.daemon_log,
                                           stderr=subprocess.STDOUT, cwd=node.folder)
        began = time.monotonic()
        for node in nodes:
            while not node.healthy():
                if node.daemon is not None and node.daemon.poll() is not None:
                    raise RuntimeError(f"{node.node_id} exited at start: see {node.folder / 'daemon.log'}")
                if time.monotonic() - began > HEALTH_TIMEOUT_S:
                    raise TimeoutError(f"{node.node_id}: /health not green in {HEALTH_TIMEOUT_S:.0f} s "
                                       f"(see {node.folder / 'daemon.log'})")
                time.sleep(0.2)
            node.pbx_line()  # the daemon's AMI login reached the fake
        kill = (MasterKill(args.kill_master_at, args.kill_master, args.accounts, seed=args.kill_seed)
                if kind in ("cluster", "sentinel") and args.kill_master_at is not None else None)
        return measure(args, kind, nodes, database_url, redis_url, folder, servers, kill)
    finally:
        stop_nodes(nodes)
        if servers is not None:
            servers.stop()
        drop()


def measure(args: argparse.Namespace, kind: str, nodes: list[Node], database_url: str, redis_url: str,
            folder: Path, servers: Any = None, kill: MasterKill | None = None) -> dict[str, Any]:
    from sqlalchemy import func, select

    from agent.adapters.sql.engine import make_engine
    from agent.adapters.sql.models import Call

    ramp_s = args.calls / args.cps
    go = time.time() + 1.0
    for node in nodes:
        node.tell_pbx(f"go {go}")
    if kill is not None:
        kill.start(servers, go)
    hold_start, hold_end = go + ramp_s, go + ramp_s + args.hold_s
    # The window: from two nibbles into the hold (every call answered and nibbling) to its end.
    window_start = hold_start + min(2 * args.nibble_ms / 1000, args.hold_s / 3)
    window_end = hold_end - 0.5
    time.sleep(max(0.0, window_start - time.time()))
    t0, first = time.time(), [n.scrape() for n in nodes]
    time.sleep(max(0.0, window_end - time.time()))
    t1, second = time.time(), [n.scrape() for n in nodes]
    live_at_start = metric_sum(first, "billing_live_calls")
    debits = metric_sum(second, "billing_nibble_debits_total") - metric_sum(first, "billing_nibble_debits_total")

    sql = make_engine(database_url, pool_size=1)
    samples: list[tuple[float, int]] = []
    deadline = time.time() + args.end_spread_s + TAIL_TIMEOUT_S
    pending = list(nodes)
    while time.time() < deadline:
        with sql.connect() as conn:
            samples.append((time.time(), int(conn.scalar(select(func.count()).select_from(Call)) or 0)))
        for node in list(pending):
            if (node.folder / "pbx-result.json").exists():
                node.result = json.loads((node.folder / "pbx-result.json").read_text())
                pending.remove(node)
        allowed = sum(len(n.result.get("allowed", [])) for n in nodes)
        # Done: every fake PBX finished, at least a row per allowed call, and no new row for 1 s
        # (a call the agent allowed after the PBX gave up on FastAGI has its NO ANSWER row too).
        steady = [rows for t, rows in samples if t >= samples[-1][0] - 1.0]
        if not pending and samples[-1][1] >= allowed and len(set(steady)) == 1 and len(steady) > 3:
            break
        time.sleep(0.2)
    if pending:
        raise TimeoutError(f"calls still running on {', '.join(n.node_id for n in pending)} "
                           f"{TAIL_TIMEOUT_S:.0f} s after the hold")
    rate, span, written = cdr_rate([s for s in samples if s[0] >= hold_end - 1])
    journal_wait_s = wait_journals_replayed(nodes)
    final = [n.scrape() for n in nodes]
    stop_daemons(nodes)  # drain (no live calls left), flush the CDRs, close the stores
    report = {
        "redis": kind, "redis_url": redis_url, "nodes": len(nodes), "calls_per_node": args.calls,
        "nibble_ms": args.nibble_ms, "placing_s_max": round(max(n.result["placing_s"] for n in nodes), 2),
        "hold_s": args.hold_s, "accounts": args.accounts, "cold_redis": args.cold,
        "nibbles": {
            "window_s": round(t1 - t0, 2), "debits": int(debits),
            "debits_per_s": round(debits / (t1 - t0), 1) if t1 > t0 else None,
            "live_calls_at_window_start": int(live_at_start),
            "ideal_per_s": round(live_at_start / (args.nibble_ms / 1000), 1),
            "debits_total_run": int(metric_sum(final, "billing_nibble_debits_total")),
        },
        "authorization": authorization_figures(nodes, final),
        "cdrs": {
            "rows_after_hold": written, "rows_per_s": round(rate, 1) if rate else None,
            "span_s": round(span, 2) if span else None,
            "offered_end_spread_s": args.end_spread_s,
            "visible_p50_s": rounded(histogram_quantile(0.5, merged_buckets(final, "billing_cdr_visible_seconds"))),
            "visible_p99_s": rounded(histogram_quantile(0.99, merged_buckets(final, "billing_cdr_visible_seconds"))),
            "written_total": int(metric_sum(final, "billing_cdr_written_total")),
        },
        "pbx": {
            "outcomes": dict(sum((Counter(n.result["outcomes"]) for n in nodes), Counter())),
            "refusal_reasons": dict(sum((Counter(n.result["reasons"]) for n in nodes), Counter())),
            "cutoffs": int(metric_sum(final, "billing_cutoffs_total")),
            "failed_cutoffs": int(metric_sum(final, "billing_failed_cutoffs_total")),
        },
        "daemon_log": log_counts(nodes),
        "journal_replayed_after_s": journal_wait_s,
    }
    sql.dispose()
    if kill is not None and kill.thread is not None:
        kill.thread.join(timeout=70)
    report["invariants"] = invariants(args, nodes, database_url, redis_url, folder)
    rows, charges, tight = call_rows(nodes), charges_per_call(database_url), int(args.accounts * args.tight_share)
    report["money"] = money_figures(rows, charges, tight)
    if kill is not None:
        report["failover"] = failover_figures(kill, nodes, rows, charges, tight)
        report["failover"]["killed_at_s_after_go"] = round(kill.killed_at - go, 2) if kill.killed_at else None
    return report


def charges_per_call(database_url: str) -> dict[str, int]:
    """What the ledger charged each call (micro-units, positive)."""
    from sqlalchemy import func, select

    from agent.adapters.sql.engine import make_engine
    from agent.adapters.sql.models import LedgerEntry

    sql = make_engine(database_url, pool_size=1)
    with sql.connect() as conn:
        rows = conn.execute(select(LedgerEntry.call_id, func.sum(LedgerEntry.amount_micros))
                            .where(LedgerEntry.kind == "charge").group_by(LedgerEntry.call_id)).all()
    sql.dispose()
    return {call_id: abs(int(total)) for call_id, total in rows if call_id}


def rounded(value: float | None, scale: float = 1.0, digits: int = 4) -> float | None:
    return None if value is None else round(value * scale, digits)


def authorization_figures(nodes: list[Node], final: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]]
                          ) -> dict[str, Any]:
    buckets = merged_buckets(final, "billing_authorize_seconds")
    agi_ms = [ms for n in nodes for ms in n.result["agi_ms"]]
    return {
        "count": int(buckets[-1][1]) if buckets else 0,
        "agent_p50_ms": rounded(histogram_quantile(0.5, buckets), 1000, 2),
        "agent_p99_ms": rounded(histogram_quantile(0.99, buckets), 1000, 2),
        "pbx_agi_p50_ms": rounded(quantile(agi_ms, 0.5), 1.0, 2),
        "pbx_agi_p99_ms": rounded(quantile(agi_ms, 0.99), 1.0, 2),
        "pbx_agi_max_ms": rounded(max(agi_ms, default=None), 1.0, 2),
    }


def log_counts(nodes: list[Node]) -> dict[str, int]:
    """What the daemons' logs say, summed over every node (the logs stay in the run's folder):
    ERROR and CRITICAL lines, and the balance steps the StoreGuard journaled because the store
    missed its deadline (``billing.store_timeout_ms``), replayed later."""
    counts: Counter[str] = Counter()
    for node in nodes:
        for line in (node.folder / "daemon.log").read_text(errors="replace").splitlines():
            counts["error_lines"] += " ERROR " in line or " CRITICAL " in line
            counts["settles_journaled"] += "settle journaled" in line
            # After a promotion: the node that claimed the new replication id rebuilt N accounts
            # from the ledger (store.py _watch_replication); calls closed against a lost step.
            if (rebuilt := REBUILD_LINE.search(line)) is not None:
                counts["promotions_seen"] += 1
                counts["accounts_rebuilt_after_promotion"] += int(rebuilt["accounts"])
            counts["calls_closed_against_a_lost_step"] += "a step lost with a Redis master" in line
            found = CIRCUIT_LINE.search(line)
            counts["store_deadline_missed"] += found is not None and found["down"] is not None
    return dict(counts)


def journal_path(node: Node) -> Path:
    return node.folder / "spool" / "balance-journal.jsonl"  # agent.daemon.journal_path of its config


def wait_journals_replayed(nodes: list[Node], timeout_s: float = 60.0) -> float:
    """Wait until no daemon holds a journaled balance step (the sweeper replays them every
    ``daemon.sweep_seconds``): stopped before, a daemon keeps them for its next start and the
    ledger check would see answered calls without their charge. Returns the seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if all(not journal_path(n).exists() or journal_path(n).stat().st_size == 0 for n in nodes):
            break
        time.sleep(0.2)
    return round(time.monotonic() - began, 2)


def invariants(args: argparse.Namespace, nodes: list[Node], database_url: str, redis_url: str,
               folder: Path) -> dict[str, Any]:
    from sqlalchemy import func, select

    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql.engine import make_engine, session_factory
    from agent.adapters.sql.models import Account, Call, LedgerEntry
    from agent.config import load_config
    from agent.services.engine import CALL_ID_UNSAFE

    sql = make_engine(database_url, pool_size=2)
    with sql.connect() as conn:
        rows = conn.execute(select(Call.id, Call.node)).all()
        accounts = conn.execute(select(Account.id, Account.balance_micros, Account.credit_limit_micros)
                                .where(Account.id.like("acct%"))).all()
        charges_per_call = Counter(conn.execute(select(LedgerEntry.call_id).where(
            LedgerEntry.kind == "charge")).scalars().all())
        cdr_dispositions = dict(conn.execute(select(Call.disposition, func.count()).group_by(Call.disposition)).all())
    def call_ids(key: str) -> set[str]:
        return {CALL_ID_UNSAFE.sub("_", f"{n.node_id}-{uid}")[:64] for n in nodes for uid in n.result[key]}

    expected, placed = call_ids("allowed"), call_ids("placed_ids")
    ids = [row.id for row in rows]
    below_floor_sql = [a.id for a in accounts if a.balance_micros < -a.credit_limit_micros]
    store = RedisBalanceStore(make_client(redis_url, 2000), session_factory(sql))
    open_at_stop = len(store.live_calls())
    # What any node's sweeper does once the TTL passed: release what no settle closed (a call
    # the agent allowed after the PBX gave up on it, a step lost with a failed pipeline...).
    ttl_ms = load_config(nodes[0].config_path).billing.reservation_ttl_seconds * 1000
    later_ms = time.time_ns() // 1_000_000 + ttl_ms + 1000
    expired = 0
    while True:
        swept = store.expire(later_ms).expired
        if not swept:
            break
        expired += len(swept)
    states = [store.account_state(a.id) for a in accounts]
    live = store.live_calls()
    with sql.connect() as conn:  # after the sweeps (they post what they closed)
        sql_balance = {str(i): int(b) for i, b in conn.execute(select(Account.id, Account.balance_micros)
                                                               .where(Account.id.like("acct%")))}
    # With no reservation left, Redis must hold exactly the ledger's balance (a write lost with a
    # killed master is rebuilt from the ledger after the promotion: store.py _watch_replication).
    store_off_sql = [s.account_id for s in states if not live and s.balance_micros != sql_balance[s.account_id]]
    store.close()
    below_floor_store = [s.account_id for s in states if s.balance_micros < -s.credit_limit_micros]
    ledger = subprocess.run(agent_command(nodes[0].config_path, "ledger", "check", "--grace-seconds", "0", "--json"),
                            capture_output=True, text=True, check=False, cwd=folder)
    try:
        ledger_report = json.loads(ledger.stdout)
    except json.JSONDecodeError:
        ledger_report = {"stdout": ledger.stdout[-500:], "stderr": ledger.stderr[-500:]}
    sql.dispose()
    tight = int(args.accounts * args.tight_share)
    return {
        "overspend_accounts_sql": below_floor_sql,
        "overspend_accounts_store": below_floor_store,
        "lowest_tight_balance_sql": min((a.balance_micros for a in accounts if int(a.id[4:]) < tight),
                                        default=None),
        "overrun_micros_store": sum(s.overrun_micros for s in states),
        "store_balance_off_sql": store_off_sql,
        "open_reservations_at_stop": open_at_stop, "expired_by_a_ttl_sweep": expired,
        "open_reservations_left": len(live),
        "calls_allowed": len(expected), "cdr_rows": len(ids),
        "cdr_missing": len(expected - set(ids)), "cdr_not_placed": len(set(ids) - placed),
        "cdr_allowed_after_the_pbx_gave_up": len(set(ids) & placed - expected),
        "cdr_duplicate_ids": len(ids) - len(set(ids)),
        "calls_charged_twice": sum(1 for c in charges_per_call.values() if c > 1),
        "cdr_dispositions": cdr_dispositions,
        "ledger_check_exit": ledger.returncode,
        "ledger_check_ok": ledger_report.get("ok"),
        "ledger_problems": [p.get("problem") for p in ledger_report.get("problems", [])][:5],
    }


def stop_daemons(nodes: list[Node]) -> None:
    for node in nodes:
        if node.daemon is not None and node.daemon.poll() is None:
            node.daemon.send_signal(signal.SIGTERM)
    for node in nodes:
        if node.daemon is not None:
            try:
                code = node.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.daemon.kill()
                code = node.daemon.wait()
            if code not in (0, -signal.SIGTERM):
                print(f"warning: {node.node_id} exited with {code} (see {node.folder / 'daemon.log'})",
                      file=sys.stderr)
            node.daemon = None
        if node.daemon_log is not None:
            node.daemon_log.close()
            node.daemon_log = None


def stop_nodes(nodes: list[Node]) -> None:
    stop_daemons(nodes)
    for node in nodes:
        if node.pbx is not None and node.pbx.poll() is None:
            try:
                node.tell_pbx("stop")
                node.pbx.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                node.pbx.kill()
                node.pbx.wait()


# ------------------------------------------------------------------ main


def summary(report: dict[str, Any]) -> str:
    n, a, c, inv, m = (report["nibbles"], report["authorization"], report["cdrs"], report["invariants"],
                       report["money"])
    ok = (not inv["overspend_accounts_sql"] and not inv["overspend_accounts_store"] and not inv["cdr_missing"]
          and not inv["cdr_not_placed"] and not inv["cdr_duplicate_ids"] and not inv["calls_charged_twice"]
          and inv["ledger_check_exit"] == 0 and not inv["open_reservations_left"]
          and not inv.get("store_balance_off_sql"))
    return "\n".join([
        f"{report['redis']}: {report['nodes']} daemons x {report['calls_per_node']} calls, "
        f"nibble {report['nibble_ms']} ms",
        f"  nibble debits/s      {n['debits_per_s']} (ideal {n['ideal_per_s']}: {n['live_calls_at_window_start']} "
        f"live calls; window {n['window_s']} s)",
        f"  authorization        agent p50 {a['agent_p50_ms']} ms, p99 {a['agent_p99_ms']} ms; as the PBX waited "
        f"p50 {a['pbx_agi_p50_ms']} ms, p99 {a['pbx_agi_p99_ms']} ms ({a['count']} decisions)",
        f"  CDRs/s into SQL      {c['rows_per_s']} ({c['rows_after_hold']} rows in {c['span_s']} s; settle->commit p50 "
        f"{c['visible_p50_s']} s, p99 {c['visible_p99_s']} s)",
        f"  invariants           {'OK' if ok else 'FAILED'}: overspend accounts {len(inv['overspend_accounts_sql'])} "
        f"(SQL) {len(inv['overspend_accounts_store'])} (store), overrun {inv['overrun_micros_store']}, "
        f"CDRs {inv['cdr_rows']} for {inv['calls_allowed']} allowed calls (missing {inv['cdr_missing']}, of no "
        f"placed call {inv['cdr_not_placed']}, allowed after the PBX gave up "
        f"{inv['cdr_allowed_after_the_pbx_gave_up']}), charged twice {inv['calls_charged_twice']}, reservations left "
        f"{inv['open_reservations_left']} (open at stop {inv['open_reservations_at_stop']}, expired by a sweep past "
        f"their TTL {inv['expired_by_a_ttl_sweep']}), ledger check exit {inv['ledger_check_exit']}, "
        f"store balance off the ledger's {len(inv.get('store_balance_off_sql', []))}",
        f"  daemon logs          {report['daemon_log']} (journaled steps all replayed after "
        f"{report['journal_replayed_after_s']} s)",
        f"  money                {m['answered_calls']} answered: money lost {m['money_lost_micros']} micro-units "
        f"(undercharged calls {m['undercharged_calls']}); {m['cut_calls']} cut ({m['cut_calls_tight_accounts']} "
        f"on tight accounts, {m['cut_by_pbx_backstop']} by the PBX backstop): cut delay p50 "
        f"{m['cut_delay_p50_ms']} ms, p99 {m['cut_delay_p99_ms']} ms, longest {m['longest_cut_delay_ms']} ms "
        f"({m['cut_delays_over_margin']} over the 1 s margin)",
        *failover_summary(report.get("failover")),
    ])


def failover_summary(f: dict[str, Any] | None) -> list[str]:
    if f is None:
        return []
    if "victim_port" not in f:
        return [f"  failover             {f.get('error')}"]
    c = f["cut_in_outage"]
    return [
        f"  failover             master :{f['victim_port']} ({f['victim_accounts']} accounts) killed -9 at "
        f"{f['killed_at_s_after_go']} s; replica promoted after {f['replica_promoted_after_s']} s"
        f"{'; ' + f['error'] if f['error'] else ''}",
        f"    outage seen        first store_unavailable {f['outage_first_unavailable_after_kill_s']} s after the "
        f"kill, last answers-again {f['outage_last_answers_again_after_kill_s']} s ({f['outage_s']} s, "
        f"{f['nodes_that_saw_it']} daemons; {f['circuits_opened_in_outage']} circuits opened "
        f"{f['circuits_opened_in_outage_by_step']} {f['circuits_opened_in_outage_by_master']}: "
        f"{f['circuit_reasons_in_outage']}; "
        f"{f['circuits_opened_before_kill']} before the kill, {f['circuits_opened_after_outage']} after)",
        f"    calls meanwhile    placed {f['calls_placed_in_outage']}, denied {f['calls_denied_in_outage']} "
        f"(denied before the kill {f['calls_denied_before_kill']}), cut {f['calls_cut_in_outage']} "
        f"({f['calls_cut_in_outage_tight']} tight)",
        f"    those cut          cut delay p50 {c['cut_delay_p50_ms']} ms, longest {c['longest_cut_delay_ms']} ms "
        f"({c['cut_delays_over_margin']} over the 1 s margin, {c['cut_by_pbx_backstop']} ended by the PBX "
        f"backstop); money lost {c['money_lost_micros']} micro-units",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="calls per node (default 2000)")
    parser.add_argument("--nibble-ms", type=int, default=1000,
                        help="nibble length; billing.nibble_seconds takes whole seconds (default 1000)")
    parser.add_argument("--cps", type=float, default=100.0, help="calls placed per second by each fake PBX")
    parser.add_argument("--hold-s", type=float, default=30.0, help="seconds every call is live together")
    parser.add_argument("--end-spread-s", type=float, default=1.0, help="the calls end within this after the hold")
    parser.add_argument("--accounts", type=int, default=100, help="accounts shared by every node")
    parser.add_argument("--tight-share", type=float, default=0.1, help="share of accounts that run out of money")
    parser.add_argument("--tight-micros", type=int, default=2_000_000, help="balance of a tight account")
    parser.add_argument("--db-pool", type=int, default=5, help="database.pool_size of each daemon (PostgreSQL "
                        "allows 100 connections here; each pool can open as many again)")
    parser.add_argument("--store-timeout-ms", type=int, default=250,
                        help="billing.store_timeout_ms and redis.timeout_ms (default 250, as shipped)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                        help="logging.level of the daemons (their logs stay in the run's folder)")
    parser.add_argument("--cold", action="store_true",
                        help="do not load the accounts into Redis before the calls (see warm_accounts)")
    parser.add_argument("--redis", choices=["cluster", "single", "both", "sentinel"], default="cluster")
    parser.add_argument("--kill-master-at", type=float, metavar="S",
                        help="cluster only: kill -9 one Redis master S seconds after the first call is placed "
                        "(its replica is promoted by the cluster) and report the outage the daemons saw, the "
                        "calls denied and cut meanwhile, the cut delays and the invariants after")
    parser.add_argument("--kill-master", choices=["most", "random"], default="most",
                        help="which master: the one owning the most accounts' slots (default) or a random one")
    parser.add_argument("--kill-seed", type=int, default=0, help="seed of --kill-master random")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    parser.add_argument("--pbx-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pbx_child:
        pbx_child(json.loads(args.pbx_child))
        return
    if args.nibble_ms < 1000 or args.nibble_ms % 1000:
        parser.error("--nibble-ms: billing.nibble_seconds is whole seconds: give a multiple of 1000")
    if args.hold_s < 3:
        parser.error("--hold-s: at least 3 s (the nibble window lies inside it)")
    if args.kill_master_at is not None and args.redis == "single":
        parser.error("--kill-master-at: a cluster or Sentinel run (--redis cluster, both or sentinel)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    reports = []
    for kind in (["cluster", "single"] if args.redis == "both" else [args.redis]):
        report = run_once(args, kind)
        reports.append(report)
        print(json.dumps(report, indent=2) if args.json else summary(report), flush=True)
    if len(reports) == 2:
        cluster, single = (r["nibbles"]["debits_per_s"] for r in reports)
        if cluster and single:
            print(f"cluster / single nibble debits/s: {cluster / single:.2f}")


if __name__ == "__main__":
    main()
