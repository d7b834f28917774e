#!/usr/bin/env python3
"""Benchmark: rating + route selection over a 1,000,000-prefix sell plan and 10 carriers with
1,000,000 buy prefixes each (issue 17).

Goals: >= 50,000 authorizations per second per core for the rating + routing part; all decks
loaded in <= 60 s and <= 1.5 GB.

    python bench/bench_routing.py                                  # full size: 1M sell + 10 x 1M buy
    python bench/bench_routing.py --prefixes 100000 --auths 50000  # a modest run first
    nice -n 10 python bench/bench_routing.py --layout shared       # the prototype layout (below)

Decks are generated in memory (no CSV, no SQL): ``--prefixes`` distinct prefixes of 5-9 digits
plus every 1- and 2-digit prefix (so every number has a rate), the same destinations on every
deck (carriers cover the same world), each carrier with its own rates (about a third dearer
than the sell price: revenue assurance drops them), increments (1/1, 6/6, 30/6, 60/60), a
connect fee on some, and ~1 % blocked rows. Each run is a fresh child process so its peak
RSS (VmHWM: interpreter included) is its own.

* ``--layout tables`` (default): what the agent does today: one
  :class:`~agent.core.ratetable.RateTable` per deck (the sell plan's and each carrier's,
  streamed into a ``RateTableBuilder`` as ``load_table`` does from SQL, without the SQL), then
  per authorization: the sell lookup, one lookup per carrier and
  :func:`agent.core.routing.select_routes` (policy ``--policy``).
* ``--layout shared``: a prototype (this file only) of what would fit the memory goal: the 10
  buy decks in *one* dict keyed by prefix whose value packs each carrier's record for that
  prefix (a carrier-index byte before each), so a prefix costs one dict entry and one object
  for all carriers, and one probe per prefix length finds every carrier's longest match.

Load time is the time to build the tables from generated rows (the daemon also reads them from
SQL: ``bench/bench_rating.py`` measures that part, per plan). Authorizations/s is in CPU time of
the process (``time.process_time``): on 2 shared, noisy cores that says what one core does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AT_MS = 1_764_763_200_000  # 2025-12-03T12:00:00Z
INCREMENTS = ((1, 1), (6, 6), (30, 6), (60, 60))


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def make_prefixes(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    found: set[str] = {str(d) for d in range(1, 10)} | {str(d) for d in range(10, 100)}
    while len(found) < count + 99:
        length = rng.choice((5, 6, 6, 7, 7, 8, 9))
        found.add(str(rng.randrange(10 ** (length - 1), 10**length)))
    return sorted(found)


def deck_row(prefix: str, index: int, deck: int) -> tuple[Any, ...]:
    """The fields of RateTableBuilder.add_fields for one row of deck ``deck`` (0: the sell plan)."""
    h = (index * 2_654_435_761 + deck * 40_503) & 0xFFFFFFFF
    if deck == 0:
        rate, fee, (first, increment) = 20_000 + h % 30_000, 0, INCREMENTS[h % 2]
    else:
        rate = 5_000 + h % 40_000  # 0.005-0.045/min against 0.02-0.05 sold
        fee = 1_000 if h % 7 == 0 else 0
        first, increment = INCREMENTS[(h >> 8) % 4]
    blocked = h % 97 == 0 and len(prefix) > 2
    return (prefix, "", rate, fee, first, increment, 0, 0, 0, None, "", 0, 1440, blocked, index)


def make_numbers(prefixes: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    numbers = []
    for _ in range(count):
        if rng.random() < 0.9:
            prefix = rng.choice(prefixes)
            total = max(len(prefix) + 1, rng.randint(11, 12))
            digits = prefix + "".join(rng.choices("0123456789", k=total - len(prefix)))
        else:
            digits = str(rng.randint(10**10, 10**12))
        numbers.append("+" + digits)
    return numbers


# ------------------------------------------------------------------------ layout "tables"


def child_tables(options: argparse.Namespace) -> dict[str, Any]:
    from agent.core.ratetable import RateTableBuilder, Refusal
    from agent.core.routing import CarrierState, RoutePolicy, select_routes

    prefixes = make_prefixes(options.prefixes, options.seed)
    numbers = make_numbers(prefixes, options.auths, options.seed + 1)
    rss_before, _ = rss_mb()
    started = time.perf_counter()
    tables = []
    for deck in range(options.carriers + 1):
        builder = RateTableBuilder("sell" if deck == 0 else f"carrier:c{deck}", currency="EUR")
        add = builder.add_fields
        for index, prefix in enumerate(prefixes):
            add(*deck_row(prefix, index, deck))
        tables.append(builder.build())
    load_seconds = time.perf_counter() - started
    rss_loaded, peak_loaded = rss_mb()
    del prefixes
    sell_table, buy_tables = tables[0], tables[1:]
    carriers = [CarrierState(f"c{k}", f"PJSIP/c{k}", priority=k % 3, weight=1 + k % 4, max_channels=1000,
                             live_channels=k * 50) for k in range(1, options.carriers + 1)]
    pairs = list(zip(carriers, buy_tables, strict=True))
    policy = RoutePolicy(options.policy)
    routed = refused = no_route = routes = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for seed, number in enumerate(numbers):
        sell = sell_table.lookup(number, AT_MS)
        if isinstance(sell, Refusal):
            refused += 1
            continue
        choice = select_routes(sell, [(c, t.lookup(number, AT_MS)) for c, t in pairs], policy, seed=seed)
        if choice.routes:
            routed += 1
            routes += len(choice.routes)
        else:
            no_route += 1
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    _, peak = rss_mb()
    return {"layout": "tables", "decks": len(tables), "rows_per_deck": len(sell_table), "load_seconds": load_seconds,
            "rss_before_mb": rss_before, "rss_loaded_mb": rss_loaded, "peak_rss_mb": max(peak, peak_loaded),
            "auths": len(numbers), "cpu_seconds": cpu, "wall_seconds": wall, "auths_per_cpu_second": len(numbers) / cpu,
            "routed": routed, "refused_by_sell_plan": refused, "no_route": no_route,
            "mean_routes": routes / max(routed, 1)}


# ------------------------------------------------------------------------ layout "shared"

_REC = struct.Struct("<BqqIIIIq?q")  # carrier index, rate, fee, first, increment, minimum, grace, -, blocked, id


def child_shared(options: argparse.Namespace) -> dict[str, Any]:
    """The prototype: one dict for all buy decks (module docstring). Rows here are always
    effective and windowless, which is what the generated decks hold."""
    from agent.core.ratetable import RateTableBuilder, Refusal
    from agent.core.rating import RateRow
    from agent.core.routing import CarrierState, RoutePolicy, select_routes

    prefixes = make_prefixes(options.prefixes, options.seed)
    numbers = make_numbers(prefixes, options.auths, options.seed + 1)
    rss_before, _ = rss_mb()
    started = time.perf_counter()
    builder = RateTableBuilder("sell", currency="EUR")
    for index, prefix in enumerate(prefixes):
        builder.add_fields(*deck_row(prefix, index, 0))
    sell_table = builder.build()
    shared: dict[int, bytes] = {}
    lengths: set[int] = set()
    pack = _REC.pack
    for index, prefix in enumerate(prefixes):
        parts = []
        for deck in range(1, options.carriers + 1):
            (_, _, rate, fee, first, increment, minimum, grace, _, _, _, _, _, blocked, rate_id) = deck_row(
                prefix, index, deck)
            parts.append(pack(deck - 1, rate, fee, first, increment, minimum, grace, 0, blocked, rate_id))
        shared[int("1" + prefix)] = b"".join(parts)
        lengths.add(len(prefix))
    load_seconds = time.perf_counter() - started
    rss_loaded, peak_loaded = rss_mb()
    del prefixes
    ordered_lengths = sorted(lengths, reverse=True)
    size = _REC.size
    unpack_from = _REC.unpack_from
    carriers = [CarrierState(f"c{k}", f"PJSIP/c{k}", priority=k % 3, weight=1 + k % 4, max_channels=1000,
                             live_channels=k * 50) for k in range(1, options.carriers + 1)]
    count = len(carriers)
    policy = RoutePolicy(options.policy)
    no_rate = Refusal.__new__(Refusal)  # placeholder for "this carrier has no rate"
    object.__setattr__(no_rate, "reason", __import__("agent.core.events", fromlist=["DenyReason"]).DenyReason.NO_RATE)
    object.__setattr__(no_rate, "detail", "no rate")
    object.__setattr__(no_rate, "number", "")
    object.__setattr__(no_rate, "row", None)
    routed = refused = no_route = routes = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for seed, number in enumerate(numbers):
        sell = sell_table.lookup(number, AT_MS)
        if isinstance(sell, Refusal):
            refused += 1
            continue
        digits = number[1:]
        key, n = int("1" + digits), len(digits)
        found: list[RateRow | Refusal | None] = [None] * count
        left = count
        for length in ordered_lengths:
            if length > n:
                continue
            entry = shared.get(key // 10 ** (n - length))
            if entry is None:
                continue
            for offset in range(0, len(entry), size):
                k, rate, fee, first, increment, minimum, grace, _, blocked, rate_id = unpack_from(entry, offset)
                if found[k] is None:
                    found[k] = no_rate if blocked else RateRow(digits[:length], "", rate, fee, first, increment,
                                                                minimum, grace, rate_id=rate_id)
                    left -= 1
            if not left:
                break
        offers = [(c, row if row is not None else no_rate) for c, row in zip(carriers, found, strict=True)]
        choice = select_routes(sell, offers, policy, seed=seed)
        if choice.routes:
            routed += 1
            routes += len(choice.routes)
        else:
            no_route += 1
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    _, peak = rss_mb()
    return {"layout": "shared", "decks": options.carriers + 1, "rows_per_deck": len(sell_table),
            "load_seconds": load_seconds, "rss_before_mb": rss_before, "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": max(peak, peak_loaded), "auths": len(numbers), "cpu_seconds": cpu, "wall_seconds": wall,
            "auths_per_cpu_second": len(numbers) / cpu, "routed": routed, "refused_by_sell_plan": refused,
            "no_route": no_route, "mean_routes": routes / max(routed, 1)}


# ----------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=1_000_000, help="prefixes per deck (default 1,000,000)")
    parser.add_argument("--carriers", type=int, default=10)
    parser.add_argument("--auths", type=int, default=200_000, help="authorizations timed")
    parser.add_argument("--policy", default="lcr", choices=("lcr", "priority", "weight"))
    parser.add_argument("--layout", default="tables", choices=("tables", "shared"))
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        figures = child_tables(options) if options.layout == "tables" else child_shared(options)
        print(json.dumps(figures))
        return
    args = [sys.executable, __file__, "--child", *sys.argv[1:]]
    done = subprocess.run(args, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    f = json.loads(done.stdout)
    goals_ok = (f["auths_per_cpu_second"] >= 50_000, f["load_seconds"] <= 60, f["peak_rss_mb"] <= 1_536)
    print(f"layout {f['layout']}: {f['decks']} decks x {f['rows_per_deck']:,} prefixes, policy {options.policy}")
    print(f"  load      {f['load_seconds']:6.1f} s (goal <= 60 s: {'ok' if goals_ok[1] else 'MISSED'})")
    print(f"  peak RSS  {f['peak_rss_mb']:6.0f} MB, {f['rss_loaded_mb']:.0f} MB once loaded, "
          f"{f['rss_before_mb']:.0f} MB before (goal <= 1,536 MB: {'ok' if goals_ok[2] else 'MISSED'})")
    print(f"  auths     {f['auths_per_cpu_second']:8,.0f}/s per core (CPU time; {f['auths']:,} in "
          f"{f['cpu_seconds']:.2f} s CPU, {f['wall_seconds']:.2f} s wall; goal >= 50,000/s: "
          f"{'ok' if goals_ok[0] else 'MISSED'})")
    print(f"  outcome   {f['routed']:,} routed ({f['mean_routes']:.1f} routes each), {f['no_route']:,} no route, "
          f"{f['refused_by_sell_plan']:,} refused by the sell plan (blocked)")


if __name__ == "__main__":
    main()
