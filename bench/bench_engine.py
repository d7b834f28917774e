"""One daemon supervising many concurrent answered calls (issue 5 figure).

    python bench/bench_engine.py --calls 10000 --seconds 30 [--store memory|redis]
    python bench/bench_engine.py --calls 2000 --seconds 20 --slow-store-ms 2000   (issue 14)

Authorizes N calls, answers them all within one second, lets them run with 1 s nibbles for the
given time, then hangs them all up. Reports timer lateness (p50/p99/max over every nibble
timer), nibble debits per second, and resident memory per live call. With ``--slow-store-ms``
every nibble batch and settle takes that long to answer (a store that is up but slow): the
timers of the calls must still fire on time, since the loop only queues store work. Run
several times and compare medians: the machine is shared.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from agent.core.events import AuthorizeRequest, Direction, LegAnswered, LegCreated, LegHungUp  # noqa: E402
from agent.core.rating import RateRow  # noqa: E402
from agent.core.session import RatedCall, RatingInfo  # noqa: E402
from agent.services.clock import SystemClock  # noqa: E402
from agent.services.engine import Engine, EngineSettings  # noqa: E402
from agent.sim.memory_store import MemoryStore  # noqa: E402

ROW = RateRow(prefix="33", destination="France", rate_micros=60_000)


class Rater:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RatedCall(ROW, RatingInfo("bench", 1, "33", ROW.rate_micros))


class NullCdr:
    def __init__(self) -> None:
        self.count = 0

    def submit(self, record: object) -> None:
        self.count += 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


SLOW_MS = 0


class SlowStore(MemoryStore):
    """Answers every nibble batch and settle ``delay_ms`` late."""

    def __init__(self, delay_ms: int) -> None:
        super().__init__()
        self.delay_s = delay_ms / 1000

    def nibbles(self, steps, now_ms):  # type: ignore[no-untyped-def]
        gevent.sleep(self.delay_s)
        return super().nibbles(steps, now_ms)

    def settle(self, call_id, seq, cost_micros, now_ms, account_id="", bundle=None):  # type: ignore[no-untyped-def]
        gevent.sleep(self.delay_s)
        super().settle(call_id, seq, cost_micros, now_ms, account_id, bundle)


def make_store(kind: str, accounts: int):  # type: ignore[no-untyped-def]
    if kind == "memory":
        store = MemoryStore() if not SLOW_MS else SlowStore(SLOW_MS)
        for i in range(accounts):
            store.add_account(f"acct{i}", 10**12)
        return store
    raise SystemExit(f"store {kind!r}: only 'memory' is wired in this script so far")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--store", default="memory")
    parser.add_argument("--slow-store-ms", type=int, default=0, help="every store answer this late")
    args = parser.parse_args()
    global SLOW_MS
    SLOW_MS = args.slow_store_ms
    clock = SystemClock()
    cdr = NullCdr()
    store = make_store(args.store, accounts=100)
    engine = Engine(settings=EngineSettings(node="bench", nibble_seconds=1), store=store, rater=Rater(),
                    clock=clock, cdr=cdr)
    engine.lateness_samples = []
    engine.start()
    gc.collect()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    for i in range(args.calls):
        request = AuthorizeRequest("asterisk", f"A{i}", f"acct{i % 100}", "33123456", clock.now_ms())
        assert engine.authorize(request).allowed
    auth_s = time.perf_counter() - t0
    spread_ms = 1000 / args.calls
    for i in range(args.calls):
        now = clock.now_ms()
        engine.on_event(LegCreated(f"B{i}", now, Direction.OUTBOUND, parent_leg_id=f"A{i}"))
        engine.on_event(LegAnswered(f"B{i}", now))
        if i % 100 == 0:
            gevent.sleep(spread_ms * 100 / 1000)
    gevent.sleep(2)
    gc.collect()
    rss_live = rss_bytes()
    engine.lateness_samples.clear()
    debits_before = engine.metrics.nibble_debits._value.get()
    cpu_before = time.process_time()
    gevent.sleep(args.seconds)
    cpu_used = time.process_time() - cpu_before
    debits = engine.metrics.nibble_debits._value.get() - debits_before
    samples = list(engine.lateness_samples)
    for i in range(args.calls):  # both legs: a caller's leg alone leaving is a transfer
        engine.on_event(LegHungUp(f"A{i}", clock.now_ms()))
        engine.on_event(LegHungUp(f"B{i}", clock.now_ms()))
    deadline = time.monotonic() + 60
    while engine.live_calls() and time.monotonic() < deadline:
        gevent.sleep(0.1)
    engine.stop(2)
    print(json.dumps({
        "calls": args.calls,
        "authorize_per_s": round(args.calls / auth_s),
        "timers_measured": len(samples),
        "lateness_ms_p50": percentile(samples, 0.5),
        "lateness_ms_p99": percentile(samples, 0.99),
        "lateness_ms_max": max(samples) if samples else 0,
        "lateness_ms_mean": round(statistics.fmean(samples), 2) if samples else 0,
        "nibble_debits_per_s": round(debits / args.seconds),
        "cpu_share_of_one_core": round(cpu_used / args.seconds, 3),
        "rss_per_live_call_kb": round((rss_live - rss_before) / args.calls / 1024, 2),
        "slow_store_ms": args.slow_store_ms,
        "cdrs": cdr.count,
        "left_live": engine.live_calls(),
    }))


if __name__ == "__main__":
    main()
