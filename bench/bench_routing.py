#!/usr/bin/env python3
"""Benchmark: rating + route selection over a 1,000,000-prefix sell plan and 10 carriers with
1,000,000 buy prefixes each (issue 17).

Goals: >= 50,000 authorizations per second per core for the rating + routing part; all decks
loaded in <= 60 s and <= 1.5 GB.

    python bench/bench_routing.py                                  # full size: 1M sell + 10 x 1M buy
    python bench/bench_routing.py --prefixes 100000 --auths 50000  # a modest run first
    nice -n 10 python bench/bench_routing.py --layout tables       # the former layout (below)

Decks are generated in memory (no CSV, no SQL): ``--prefixes`` distinct prefixes of 5-9 digits
plus every 1- and 2-digit prefix (so every number has a rate), the same destinations on every
deck (carriers cover the same world), each carrier with its own rates (about a third dearer
than the sell price: revenue assurance drops them), increments (1/1, 6/6, 30/6, 60/60), a
connect fee on some, and ~1 % blocked rows. Each run is a fresh child process so its peak
RSS (VmHWM: interpreter included) is its own.

* ``--layout index`` (default): what the route book does: the sell plan in a
  :class:`~agent.core.ratetable.RateTable`, the 10 buy decks in one
  :class:`~agent.core.buy_index.BuyIndex` (one dict of prefixes for all decks, a packed array
  of RateTable records per deck), each deck streamed into a ``RateTableBuilder`` and merged
  before the next is made, as ``RouteBook.preload`` does from SQL; per authorization the sell
  lookup and :func:`agent.core.buy_index.select_offers` (one probe per prefix length for all
  carriers, the loss rule's points kept per pair of row shapes, no row object for a carrier left out).
* ``--layout tables``: the former route book: one ``RateTable`` per deck, then per
  authorization the sell lookup, one lookup per carrier and
  :func:`agent.core.routing.select_routes` (policy ``--policy``). Both layouts give the same
  outcome counts (routed, routes each, no route).

Load time is the time to build the tables from generated rows (the daemon also reads them from
SQL: ``bench/bench_rating.py`` measures that part, per plan). Authorizations/s is in CPU time of
the process (``time.process_time``): on 2 shared, noisy cores that says what one core does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


# ------------------------------------------------------------------------ layout "index"


def child_index(options: argparse.Namespace) -> dict[str, Any]:
    """What the route book does now: the buy decks in one BuyIndex (agent/core/buy_index.py),
    each deck streamed into a RateTableBuilder and merged before the next is read (as
    ``RouteBook.preload`` does from SQL), then per authorization the sell lookup and
    ``select_offers`` (the code ``RouteBook.routes`` runs, minus its cached carriers/policy reads)."""
    from agent.core.buy_index import BuyIndex, prepare_offers, select_offers
    from agent.core.ratetable import RateTableBuilder, Refusal
    from agent.core.routing import CarrierState, LossVerdicts, RoutePolicy

    prefixes = make_prefixes(options.prefixes, options.seed)
    numbers = make_numbers(prefixes, options.auths, options.seed + 1)
    rss_before, _ = rss_mb()
    started = time.perf_counter()
    builder = RateTableBuilder("sell", currency="EUR")
    for index, prefix in enumerate(prefixes):
        builder.add_fields(*deck_row(prefix, index, 0))
    sell_table = builder.build()

    def buy_decks(prefixes: list[str]) -> Any:
        for deck in range(1, options.carriers + 1):
            buy = RateTableBuilder(f"carrier:c{deck}", currency="EUR")
            add = buy.add_fields
            for index, prefix in enumerate(prefixes):
                add(*deck_row(prefix, index, deck))
            yield buy

    book = BuyIndex().with_decks(buy_decks(prefixes))
    load_seconds = time.perf_counter() - started
    rss_loaded, peak_loaded = rss_mb()
    del prefixes
    carriers = [CarrierState(f"c{k}", f"PJSIP/c{k}", priority=k % 3, weight=1 + k % 4, max_channels=1000)
                for k in range(1, options.carriers + 1)]
    live = {c.name: k * 50 for k, c in enumerate(carriers, 1)}
    offers = prepare_offers(book, [(c, f"carrier:{c.name}", None) for c in carriers])
    verdicts = LossVerdicts()
    policy = RoutePolicy(options.policy)
    routed = refused = no_route = routes = 0
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for seed, number in enumerate(numbers):
        sell = sell_table.lookup(number, AT_MS)
        if isinstance(sell, Refusal):
            refused += 1
            continue
        choice = select_offers(sell, number, AT_MS, book, offers, policy, live_channels=live, seed=seed,
                               verdicts=verdicts)
        if choice.routes:
            routed += 1
            routes += len(choice.routes)
        else:
            no_route += 1
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    _, peak = rss_mb()
    return {"layout": "index", "decks": options.carriers + 1, "rows_per_deck": len(sell_table),
            "load_seconds": load_seconds, "rss_before_mb": rss_before, "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": max(peak, peak_loaded), "auths": len(numbers), "cpu_seconds": cpu, "wall_seconds": wall,
            "auths_per_cpu_second": len(numbers) / cpu, "routed": routed, "refused_by_sell_plan": refused,
            "no_route": no_route, "mean_routes": routes / max(routed, 1), "loss_verdicts_kept": verdicts.size}


# ----------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=1_000_000, help="prefixes per deck (default 1,000,000)")
    parser.add_argument("--carriers", type=int, default=10)
    parser.add_argument("--auths", type=int, default=200_000, help="authorizations timed")
    parser.add_argument("--policy", default="lcr", choices=("lcr", "priority", "weight"))
    parser.add_argument("--layout", default="index", choices=("index", "tables"))
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        figures = child_tables(options) if options.layout == "tables" else child_index(options)
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
