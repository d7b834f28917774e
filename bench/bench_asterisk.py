"""Asterisk edge figures (issue 6): FastAGI authorization latency, concurrent AGI sessions, AMI events/s.

    python bench/bench_asterisk.py                        # 3 runs of each, medians
    python bench/bench_asterisk.py --rate 200 --calls 3000 --concurrent 500 --events 60000 --runs 3
    python bench/bench_asterisk.py --fraud-rules fraud/rules.yaml --rate 1000 --calls 10000 --concurrent 10
    python bench/bench_asterisk.py --carriers 10 --rate 1000 --calls 10000 --concurrent 10

1. Authorization through real FastAGI on loopback at ``--rate`` calls/s. A load generator in its
   own process (this script with ``--agi-client``) plays Asterisk's side of res_agi: it connects,
   writes the environment block of capture agi-1 (PJSIP), answers the agent's ``GET VARIABLE
   CHANNEL(pjsip,call-id)`` and ``SET VARIABLE`` lines, and times from connect() to the agent's
   close (the moment the dialplan goes on with ``BILLING_DECISION`` set). In between: our FastAGI
   server, the adapter, the real call engine (agent/services/engine.py) and the real Redis balance
   store (agent/adapters/redis/store.py, 127.0.0.1:6379, accounts loaded from a scratch SQLite
   ledger). Target: p50 <= 1 ms, p99 <= 5 ms at 200/s.
2. ``--concurrent`` AGI sessions open at once: every client stops at the agent's first command
   until all of them are connected, then they all answer together. Target: 500 without errors.
3. AMI events parsed and applied: a fake AMI server in its own process (``--ami-flood``) writes
   ``--events`` call-class events (the blocks of capture ami-1, renumbered per call: Newchannel,
   Newstate, DialBegin, DialEnd, BridgeEnter/Leave, Hangup, ...) as fast as the socket takes
   them, and answers the adapter's Getvar (Call-ID) actions in between. We time until the engine
   has applied every leg event (its inbox drained); every call was authorized first, so the
   events drive real sessions to their CDR. A second figure replays the bytes from memory through
   parser + translation + hand-off (CPU time, no socket). Target: >= 5,000 events/s.

``--fraud-rules FILE`` and ``--carriers N`` measure only the authorization, without and with
the fraud rules (Redis counters) or wholesale routing (N carriers with buy decks in the route
book, the daemon's CallRouter: every decision carries N routes), interleaved, and the difference.

The machine has 2 shared, noisy cores: each figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # redis-py and the SQL driver must yield to the hub, as in the daemon

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.lock  # noqa: E402
import gevent.pool  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from agent.adapters.asterisk.adapter import AsteriskAdapter, AsteriskSettings  # noqa: E402
from agent.adapters.asterisk.ami import AmiSettings  # noqa: E402
from agent.adapters.asterisk.ami_protocol import AmiParser  # noqa: E402
from agent.core.events import AuthorizeDecision, AuthorizeRequest, LegEvent  # noqa: E402
from agent.core.rating import RateRow  # noqa: E402
from agent.core.session import RatedCall, RatingInfo  # noqa: E402
from agent.daemon import freeze_startup_objects  # noqa: E402
from agent.services.clock import SystemClock  # noqa: E402
from agent.services.engine import Engine, EngineSettings  # noqa: E402
from agent.sim.asterisk import FakeAsterisk  # noqa: E402
from agent.sim.memory_store import MemoryStore  # noqa: E402

CAPTURES = Path("/work/shared/captures/asterisk")
RATE = RateRow(prefix="1", destination="USA", rate_micros=60_000)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ACCOUNTS = 50
SECRET = "bench"


class OneRate:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RatedCall(RATE, RatingInfo("bench", 1, "1", RATE.rate_micros, plan_currency="EUR", currency="EUR"))


class Cdrs:
    def __init__(self) -> None:
        self.count = 0

    def submit(self, record: Any) -> None:
        self.count += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# ------------------------------------------------------------------------------------ the agent side


def redis_engine(workdir: str) -> tuple[Engine, Any]:
    """The real engine on the Redis balance store, accounts in a scratch SQLite ledger."""
    from agent.adapters.redis.store import RedisBalanceStore, make_client
    from agent.adapters.sql import accounts as repo
    from agent.adapters.sql.engine import make_engine, session_factory, transaction
    from agent.adapters.sql.migrate import upgrade
    from agent.adapters.sql.plans import create_plan
    from agent.services.store_port import EngineStoreAdapter

    sql = make_engine(f"sqlite:///{workdir}/ledger.db")
    upgrade(sql)
    sessions = session_factory(sql)
    with transaction(sessions) as s:
        create_plan(s, "bench")
        for index in range(ACCOUNTS):
            repo.create_account(s, f"acct{index}", plan="bench", balance_micros=10**12)
    prefix = f"bench-ast:{uuid.uuid4().hex[:8]}:"
    store = RedisBalanceStore(make_client(REDIS_URL, 2000), sessions, key_prefix=prefix)
    engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=6),
                    store=EngineStoreAdapter(store, node="bench", ttl_ms=600_000), rater=OneRate(),
                    clock=SystemClock(), cdr=Cdrs())
    engine.start()
    return engine, (store, prefix, sql)


def cleanup_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


class TimedAdapter(AsteriskAdapter):
    """Notes how long each AGI session takes inside the agent (environment read to close)."""

    agent_ms: list[float]
    reach_ms: list[float]

    def _authorize_session(self, session: Any, env: Any) -> None:
        started = time.perf_counter()
        sent = env.get("agi_threadid")
        if sent.isdigit():  # from the client's connect() to here: TCP, accept, greenlet, environment
            self.reach_ms.append((started - int(sent) / 1e9) * 1000)
        try:
            super()._authorize_session(session, env)
        finally:
            self.agent_ms.append((time.perf_counter() - started) * 1000)


def start_agent(engine: Any, fake: FakeAsterisk) -> AsteriskAdapter:
    adapter = TimedAdapter(engine, AsteriskSettings(
        agi_port=0, ami=AmiSettings(port=fake.ami_port, secret=SECRET, ping_interval_s=10.0)))
    adapter.agent_ms = []
    adapter.reach_ms = []
    if isinstance(engine, Engine):
        engine.add_switch(adapter)
    adapter.start()
    if not adapter.synced.wait(10):
        raise RuntimeError(f"no AMI: {adapter.ami.last_error}")
    return adapter


def spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                               text=True)
    return process, read_json(process)


def read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    """One JSON line from the child, read cooperatively (the agent's greenlets keep running)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    while not buffer.endswith(b"\n"):
        socket.wait_read(fd)
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise RuntimeError("the child process exited without a result")
        buffer += chunk
    return dict(json.loads(buffer.decode().strip().splitlines()[-1]))


class NoActions:
    """Fraud actions that write nothing (the bench measures the screen, not SQL)."""

    def record_alerts(self, alerts: Any) -> None:
        pass

    def suspend(self, account_id: str, rule: str, at_ms: int) -> bool:
        return True

    def cut_elsewhere(self, account_id: str, node: str, reason: str) -> list[str]:
        return []


def add_fraud_screen(engine: Engine, rules_path: str, prefix: str, client: Any) -> Any:
    """The fraud rules of ``rules_path`` on Redis counters, every action made an alert (the traffic
    is the same with and without them: only the cost of the screen is measured). ``client``: the
    balance store's, as the daemon does (the counters' observe rides in its round trip)."""
    import dataclasses as dc

    from agent.adapters.fraud_rules_file import load_rules
    from agent.adapters.redis.counters import RedisFraudCounters
    from agent.core.fraud_rules import Action, RuleSet
    from agent.services.fraud import FraudGuard

    loaded = load_rules(rules_path)
    rules = RuleSet(tuple(dc.replace(r, action=Action.ALERT, deny_group_only=False) for r in loaded.rules),
                    loaded.groups)
    guard = FraudGuard(rules, node="bench", actions=NoActions(), clock=SystemClock(),
                       counters=RedisFraudCounters(client, key_prefix=prefix, rules=rules))
    engine.screens.append(guard)
    engine.on_finished.append(guard.finished)
    guard.start()
    return guard


def add_routing(engine: Engine, sql: Any, workdir: str, carriers: int) -> Any:
    """``carriers`` carriers, each with a buy deck for the bench's destination below the sell
    price, in a route book as the daemon builds it, and the daemon's router in the engine."""
    from agent.adapters.sql.carriers import create_carrier
    from agent.adapters.sql.engine import session_factory, transaction
    from agent.adapters.sql.rate_import import import_deck
    from agent.adapters.sql.route_book import RouteBook
    from agent.services.routes import CallRouter

    sessions = session_factory(sql)
    for index in range(carriers):
        with transaction(sessions) as session:
            create_carrier(session, f"carrier{index}", trunk=f"PJSIP/carrier{index}", priority=index)
        deck = Path(workdir) / f"buy{index}.csv"
        deck.write_text(f"prefix,destination,rate\n1,USA,0.{10 + index:03d}\n1212,New York,0.{20 + index:03d}\n")
        import_deck(sessions, deck, "", carrier=f"carrier{index}")
    book = RouteBook(sql, SystemClock().now_ms, background=True)
    book.preload()
    router = CallRouter(book, node="bench", live_channels=lambda: engine.carrier_calls)
    engine.router = router
    engine.on_finished.append(router.finished)
    return book


def authorization_run(rate: float, calls: int, concurrent: int, fraud_rules: str = "",
                      carriers: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        engine, (store, prefix, sql) = redis_engine(workdir)
        guard = add_fraud_screen(engine, fraud_rules, prefix, store.client) if fraud_rules else None
        book = add_routing(engine, sql, workdir, carriers) if carriers else None
        fake = FakeAsterisk("127.0.0.1", 1, ami_secret=SECRET).start()  # AMI only: the agent needs it up
        adapter = start_agent(engine, fake)
        try:
            for index in range(ACCOUNTS):  # warm the cache: accounts load from SQL on first use
                engine.authorize(AuthorizeRequest("asterisk", f"warm{index}", f"acct{index}", "12125551234",
                                                  int(time.time() * 1000)))
            # As the daemon does once started: full collections no longer scan what the start
            # built (without it a 3,000-call run saw gen-2 pauses of 85-176 ms, a p99 of its own).
            freeze_startup_objects()
            process, result = spawn("--agi-client", str(adapter.agi_port), "--rate", str(rate), "--calls",
                                    str(calls), "--concurrent", str(concurrent))
            process.wait()
            paced_ms = adapter.agent_ms[:calls]  # type: ignore[attr-defined]
            result["agent_share_p50_ms"] = round(percentile(paced_ms, 0.50), 3)
            result["agent_share_p99_ms"] = round(percentile(paced_ms, 0.99), 3)
            reach_ms = adapter.reach_ms[:calls]  # type: ignore[attr-defined]
            result["connect_to_handler_p50_ms"] = round(percentile(reach_ms, 0.50), 3)
            result["connect_to_handler_p99_ms"] = round(percentile(reach_ms, 0.99), 3)
            result["agent_errors"] = adapter.agi.stats.errors + adapter.agi.stats.closed_early
            result["agent_sessions"] = adapter.agi.stats.sessions
            return result
        finally:
            adapter.stop(2)
            fake.stop()
            engine.stop(2)
            if guard is not None:
                guard.stop(1)
            if book is not None:
                book.close()
            import gc

            gc.unfreeze()  # the next run freezes its own start
            store.close()
            sql.dispose()
            cleanup_redis(prefix)


class Timed:
    """Counts the leg events handed to the engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0
        self.first = 0.0

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        return self.inner.authorize(request)  # type: ignore[no-any-return]

    def on_event(self, event: LegEvent) -> None:
        if not self.count:
            self.first = time.perf_counter()
        self.count += 1
        self.inner.on_event(event)


def events_run(events: int) -> dict[str, Any]:
    store = MemoryStore()
    for index in range(ACCOUNTS):
        store.add_account(f"acct{index}", 10**12)
    cdrs = Cdrs()
    engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=6), store=store, rater=OneRate(),
                    clock=SystemClock(), cdr=cdrs)
    engine.start()
    template = call_template()
    calls = max(1, events // len(template))
    for index in range(calls):  # the engine knows every call before its events come
        a_leg, _ = leg_ids(index)
        assert engine.authorize(AuthorizeRequest("asterisk", a_leg, f"acct{index % ACCOUNTS}", "12125551234",
                                                 int(time.time() * 1000), group_id=a_leg)).allowed
    process, hello = spawn("--ami-flood", str(calls))
    timed = Timed(engine)

    class Port:
        ami_port = int(hello["listening"])

    adapter = AsteriskAdapter(timed, AsteriskSettings(agi_port=0, ami=AmiSettings(port=Port.ami_port,
                                                                                   secret=SECRET)))
    engine.add_switch(adapter)
    try:
        adapter.start()
        flood = read_json(process)
        total = flood["events"]
        while adapter.stats.events < total:
            gevent.sleep(0.001)
        handed_s = time.perf_counter() - timed.first
        inbox = engine._inbox  # the engine's queue: drained = every leg event applied
        while not inbox.empty():
            gevent.sleep(0.001)
        applied_s = time.perf_counter() - timed.first
        deadline = time.monotonic() + 30
        while cdrs.count < calls and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.flush()
        adapter.stop(2)
        engine.stop(2)
        process.wait(10)
    return {"events": total, "calls": calls, "mean_event_bytes": flood["mean_event_bytes"],
            "handed_over_per_s": round(total / handed_s), "applied_per_s": round(total / applied_s),
            "leg_events": timed.count, "cdrs": cdrs.count, "garbage": adapter.ami.stats.garbage,
            "call_id_lookups": adapter.stats.call_id_lookups}


def memory_events_run(events: int) -> dict[str, Any]:
    """The flood's bytes from memory through parser + translation + hand-off (no socket, no engine)."""
    template = call_template()
    calls = max(1, events // len(template))
    data = b"".join(b"".join(call_blocks(template, index)) for index in range(calls))

    class Counting:
        count = 0

        def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
            raise AssertionError("not used")

        def on_event(self, event: LegEvent) -> None:
            self.count += 1

    engine = Counting()
    adapter = AsteriskAdapter(engine, AsteriskSettings(fetch_call_ids=False))  # not started: event path only
    parser = AmiParser()
    parser.feed(b"Asterisk Call Manager/9.0.0\r\n")
    started = time.process_time()
    for offset in range(0, len(data), 256 * 1024):
        for message in parser.feed(data[offset:offset + 256 * 1024]):
            adapter._on_event(message)
    cpu_s = time.process_time() - started
    total = calls * len(template)
    return {"events": total, "cpu_s": round(cpu_s, 3), "events_per_cpu_s": round(total / cpu_s),
            "leg_events": engine.count}


# ------------------------------------------------------------------------------------ the PBX side (children)


def call_template() -> list[bytes]:
    """The call-class event blocks of capture ami-1 (what a ``read = call`` user receives)."""
    raw = (CAPTURES / "ami-1-cut-by-limit.txt").read_bytes()
    blocks = raw.split(b"\r\n\r\n")
    return [block + b"\r\n\r\n" for block in blocks if b"\r\nPrivilege: call,all" in block]


def leg_ids(index: int) -> tuple[str, str]:
    return f"1795400000.{2 * index}", f"1795400000.{2 * index + 1}"


def call_blocks(template: list[bytes], index: int) -> list[bytes]:
    a_leg, b_leg = leg_ids(index)
    swaps = [(b"1795335056.4", a_leg.encode()), (b"1795335056.5", b_leg.encode()),
             (b"SIP/127.0.0.1-00000004", b"SIP/127.0.0.1-%08x" % (2 * index)),
             (b"SIP/carrier-00000005", b"SIP/carrier-%08x" % (2 * index + 1)),
             (b"6aa73ed5-cc7c-4698-a2e2-3d26270704b7", b"bridge-%032d" % index)]
    out = []
    for block in template:
        renumbered = block
        for old, new in swaps:
            renumbered = renumbered.replace(old, new)
        out.append(renumbered)
    return out


def ami_flood_main(calls: int) -> int:
    template = call_template()
    chunks = [b"".join(call_blocks(template, index)) for index in range(calls)]
    total = calls * len(template)
    done = gevent.event.Event()

    def serve(sock: socket.socket, address: Any) -> None:
        lock = gevent.lock.Semaphore()
        ready = gevent.event.Event()

        def write(data: bytes) -> None:
            with lock:
                sock.sendall(data)

        def reader() -> None:
            buffer = b""
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
                    action, action_id = fields.get("Action", ""), fields.get("ActionID", "")
                    if action == "Login":
                        write(b"Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n"
                              % action_id.encode())
                    elif action == "CoreShowChannels":
                        write(b"Response: Success\r\nActionID: %s\r\nEventList: start\r\nMessage: Channels will "
                              b"follow\r\n\r\nEvent: CoreShowChannelsComplete\r\nActionID: %s\r\nEventList: "
                              b"Complete\r\nListItems: 0\r\n\r\n" % (action_id.encode(), action_id.encode()))
                        ready.set()
                    elif action == "Getvar":
                        write(b"Response: Success\r\nActionID: %s\r\nVariable: %s\r\nValue: %s@127.0.0.1\r\n\r\n"
                              % (action_id.encode(), fields.get("Variable", "").encode(),
                                 fields.get("Channel", "").encode()))
                    else:
                        write(b"Response: Success\r\nActionID: %s\r\n\r\n" % action_id.encode())

        def safe_reader() -> None:
            try:
                reader()
            except OSError:  # the agent went away first
                pass

        sock.sendall(b"Asterisk Call Manager/9.0.0\r\n")
        greenlet = gevent.spawn(safe_reader)
        ready.wait()
        gevent.sleep(0.05)  # the adapter handed PbxConnected over
        started = time.perf_counter()
        for chunk in chunks:
            write(chunk)
        written_s = time.perf_counter() - started
        print(json.dumps({"events": total, "flood_write_s": written_s,
                          "mean_event_bytes": round(sum(map(len, chunks)) / total)}), flush=True)
        done.wait()
        greenlet.kill()

    server = StreamServer(("127.0.0.1", 0), serve)
    server.start()
    print(json.dumps({"listening": server.server_port}), flush=True)

    def wait_stdin() -> None:  # the parent writes a line when it is done (sys.stdin would block the hub)
        socket.wait_read(sys.stdin.fileno())
        done.set()

    gevent.spawn(wait_stdin)
    done.wait()
    server.stop(timeout=1)
    return 0


@functools.cache
def agi_env_template() -> str:
    env = (CAPTURES / "agi-1-authorize-01.txt").read_text().split("\n>> ")[0]
    lines = [line[3:] for line in env.split("\n") if line.startswith("<< ")]
    return "\n".join(lines) + "\n\n"


def agi_env(index: int) -> bytes:
    text = agi_env_template()
    account = f"acct{index % ACCOUNTS}"
    text = (text.replace("agi_type: SIP", "agi_type: PJSIP").replace("1795335056.4", f"1795500000.{index}")
            .replace("agi_accountcode: 1001", f"agi_accountcode: {account}")
            .replace("agi_arg_1: 1001", f"agi_arg_1: {account}"))
    return text.encode()


def agi_call(port: int, index: int, barrier: tuple[gevent.event.Event, list[int], int] | None,
             decided: list[float] | None = None) -> tuple[float, str]:
    """One FastAGI session as res_agi plays it; returns (seconds to the agent's close, decision)
    and appends the seconds to the decision (``EXEC MSet`` with ``BILLING_DECISION``, or the older
    ``SET VARIABLE BILLING_DECISION``) to ``decided``."""
    started = time.perf_counter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no create_connection: its getaddrinfo
    sock.connect(("127.0.0.1", port))  # goes through gevent's resolver thread pool, res_agi's connect() does not
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decision = ""
    try:
        # agi_threadid carries the client's CLOCK_MONOTONIC instant of connect() (same clock in both processes)
        sock.sendall(agi_env(index).replace(b"agi_threadid: 140649365198528",
                                            b"agi_threadid: %d" % int(started * 1e9)))
        buffer = b""
        first = True
        while True:
            data = sock.recv(4096)
            if not data:
                break
            buffer += data
            replies = []
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode()
                if command.startswith("GET VARIABLE"):
                    replies.append(b"200 result=1 (bench-%d@127.0.0.1)\n" % index)
                elif command.startswith("SET VARIABLE"):
                    if command.startswith("SET VARIABLE BILLING_DECISION"):
                        decision = command.split()[-1].strip('"') + decision
                        if decided is not None:
                            decided.append(time.perf_counter() - started)
                    elif command.startswith("SET VARIABLE BILLING_REASON"):
                        decision = ":" + command.split()[-1].strip('"')
                    replies.append(b"200 result=1\n")
                elif command.lower().startswith("exec mset "):  # the agent's one decision command
                    pairs = dict(pair.partition("=")[::2] for pair in command[10:].strip().strip('"').split(","))
                    if "BILLING_DECISION" in pairs:
                        decision = pairs["BILLING_DECISION"] + (f":{pairs['BILLING_REASON']}"
                                                                if pairs.get("BILLING_REASON") else "")
                        if decided is not None:
                            decided.append(time.perf_counter() - started)
                    replies.append(b"200 result=0\n")
                else:
                    replies.append(b"510 Invalid or unknown command\n")
            if first and barrier is not None:  # hold the session open until every client is connected
                first = False
                event, waiting, wanted = barrier
                waiting.append(index)
                if len(waiting) >= wanted:
                    event.set()
                event.wait(30)
            if replies:
                sock.sendall(b"".join(replies))
    finally:
        sock.close()
    return time.perf_counter() - started, decision


def agi_client_main(port: int, rate: float, calls: int, concurrent: int) -> int:
    pool = gevent.pool.Pool(2000)
    results: list[tuple[float, str]] = []
    decided: list[float] = []
    errors: list[str] = []

    def one(index: int, barrier: Any = None) -> None:
        try:
            results.append(agi_call(port, index, barrier, None if barrier else decided))
        except OSError as exc:
            errors.append(str(exc))

    started = time.perf_counter()
    for index in range(calls):  # paced: call i starts at i / rate
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        pool.spawn(one, index)
    pool.join()
    latencies_ms = [seconds * 1000 for seconds in decided]
    closed_ms = [seconds * 1000 for seconds, _ in results]
    denied = sum(1 for _, decision in results if decision != "allow")
    paced = {"p50_ms": round(percentile(latencies_ms, 0.50), 3), "p99_ms": round(percentile(latencies_ms, 0.99), 3),
             "max_ms": round(max(latencies_ms, default=0), 3),
             "closed_p50_ms": round(percentile(closed_ms, 0.50), 3),
             "closed_p99_ms": round(percentile(closed_ms, 0.99), 3), "calls": len(results), "denied": denied,
             "client_errors": len(errors)}
    # Concurrent sessions: all open at once, held at the agent's first command.
    results.clear()
    barrier: tuple[gevent.event.Event, list[int], int] = (gevent.event.Event(), [], concurrent)
    started = time.perf_counter()
    for index in range(concurrent):
        pool.spawn(one, calls + index, barrier)
    pool.join()
    reasons: dict[str, int] = {}
    for _, decision in results:
        if decision != "allow":
            reasons[decision] = reasons.get(decision, 0) + 1
    burst = {"burst_refusals": reasons, "concurrent": concurrent, "held_open_together": len(barrier[1]),
             "burst_s": round(time.perf_counter() - started, 3),
             "burst_allowed": sum(1 for _, d in results if d == "allow"),
             "burst_errors": len(errors) - paced["client_errors"] + sum(1 for _, d in results if d != "allow")}
    print(json.dumps({**paced, **burst}), flush=True)
    return 0


# ------------------------------------------------------------------------------------ main


def fraud_comparison(args: argparse.Namespace) -> int:
    """Authorization through FastAGI at ``--rate`` without and with the fraud rules (or the
    carriers' routing), interleaved."""
    off: list[dict[str, Any]] = []
    on: list[dict[str, Any]] = []
    for _ in range(args.runs):
        off.append(authorization_run(args.rate, args.calls, args.concurrent))
        on.append(authorization_run(args.rate, args.calls, args.concurrent, args.fraud_rules or "", args.carriers))
        print(json.dumps({"off": off[-1], "on": on[-1]}), flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    summary = {"rate": args.rate, "calls": args.calls, "runs": args.runs, "rules": args.fraud_rules,
               "carriers": args.carriers}
    for key in ("p50_ms", "p99_ms", "agent_share_p50_ms", "agent_share_p99_ms"):
        summary[f"off_{key}"] = med(off, key)
        summary[f"on_{key}"] = med(on, key)
        summary[f"added_{key}"] = round(med(on, key) - med(off, key), 3)
    summary["denied_on"] = med(on, "denied")
    with open("/proc/loadavg") as loadavg:
        summary["loadavg_1min"] = float(loadavg.read().split()[0])
    print(json.dumps({"summary": summary}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrent", type=int, default=500)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--agi-client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--ami-flood", type=int, metavar="CALLS", help=argparse.SUPPRESS)
    parser.add_argument("--fraud-rules", metavar="FILE",
                        help="only authorization: runs without and with these fraud rules (Redis counters), "
                             "interleaved, and the difference")
    parser.add_argument("--carriers", type=int, default=0,
                        help="only authorization: runs without and with wholesale routing over this many carriers, "
                             "interleaved, and the difference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.agi_client:
        return agi_client_main(args.agi_client, args.rate, args.calls, args.concurrent)
    if args.ami_flood:
        return ami_flood_main(args.ami_flood)
    if args.fraud_rules or args.carriers:
        return fraud_comparison(args)

    auth = [authorization_run(args.rate, args.calls, args.concurrent) for _ in range(args.runs)]
    for run in auth:
        print(json.dumps({"authorization": run}), flush=True)
    memory = [memory_events_run(args.events) for _ in range(args.runs)]
    for run in memory:
        print(json.dumps({"events_from_memory": run}), flush=True)
    socket_runs = [events_run(args.events) for _ in range(args.runs)]
    for run in socket_runs:
        print(json.dumps({"events_over_socket": run}), flush=True)

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    summary = {
        "auth_rate": args.rate, "auth_p50_ms": med(auth, "p50_ms"), "auth_p99_ms": med(auth, "p99_ms"),
        "auth_max_ms": med(auth, "max_ms"), "auth_denied": med(auth, "denied"),
        "auth_to_close_p50_ms": med(auth, "closed_p50_ms"), "auth_to_close_p99_ms": med(auth, "closed_p99_ms"),
        "agent_share_p50_ms": med(auth, "agent_share_p50_ms"), "agent_share_p99_ms": med(auth, "agent_share_p99_ms"),
        "concurrent_sessions": args.concurrent, "concurrent_held_together": med(auth, "held_open_together"),
        "concurrent_errors": med(auth, "burst_errors"), "agent_errors": med(auth, "agent_errors"),
        "events_per_cpu_s_memory": med(memory, "events_per_cpu_s"),
        "events_per_s_socket_handed_over": med(socket_runs, "handed_over_per_s"),
        "events_per_s_socket_real_engine_applied": med(socket_runs, "applied_per_s"),
    }
    summary["targets_met"] = (summary["auth_p50_ms"] <= 1.0 and summary["auth_p99_ms"] <= 5.0
                              and summary["concurrent_errors"] == 0
                              and summary["events_per_s_socket_real_engine_applied"] >= 5000)
    with open("/proc/loadavg") as loadavg:  # the machine is shared: say how busy it was
        summary["loadavg_1min"] = float(loadavg.read().split()[0])
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
