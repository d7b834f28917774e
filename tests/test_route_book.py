"""The daemon's route book (agent/adapters/sql/route_book.py) on SQLite, PostgreSQL and MariaDB:
the buy decks loaded like sell plans, reloaded when an import bumps their version, carriers and
route policies read through the cached look-ups (a disabled carrier avoided after the cache's
ttl), carriers in another currency or still loading left out with the reason."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import gevent
from sqlalchemy import Engine

from agent.adapters.sql.carriers import create_carrier, set_enabled, set_route_policy
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.rate_import import import_deck
from agent.adapters.sql.route_book import RouteBook
from agent.core.events import DenyReason
from agent.core.rating import RateRow
from agent.core.routing import RoutePolicy, SkipReason

AT_MS = int(datetime(2026, 12, 3, 12, tzinfo=UTC).timestamp() * 1000)
SELL = RateRow("44", "UK", 20_000, initial_increment=60, increment=60, rate_id=1)  # 0.02/min


class Clock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> int:
        return self.ms


def deck(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.csv"
    path.write_text("prefix,destination,rate,initial_increment,increment,blocked\n" + text)
    return path


def setup(engine: Engine, tmp_path: Path) -> None:
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        create_plan(session, "retail")
        create_carrier(session, "cheap", trunk="PJSIP/cheap", priority=2, max_channels=2)
        create_carrier(session, "dear", trunk="PJSIP/dear", priority=0)
        create_carrier(session, "mid", trunk="PJSIP/mid", priority=1)
        create_carrier(session, "usd", trunk="PJSIP/usd", currency="USD")
        create_carrier(session, "nodeck", trunk="PJSIP/nodeck")
    import_deck(sessions, deck(tmp_path, "cheap", "44,UK,0.010,60,60,\n4477,UK premium,0.5,1,1,true\n"),
                "", carrier="cheap")
    import_deck(sessions, deck(tmp_path, "dear", "44,UK,0.030,1,1,\n"), "", carrier="dear")
    import_deck(sessions, deck(tmp_path, "mid", "4,Europe,0.015,1,1,\n"), "", carrier="mid")
    import_deck(sessions, deck(tmp_path, "usd", "44,UK,0.001,1,1,\n"), "", carrier="usd")


def test_routes_from_the_loaded_buy_decks(engine: Engine, tmp_path: Path) -> None:
    setup(engine, tmp_path)
    book = RouteBook(engine, Clock())
    assert sorted(book.preload()) == ["carrier:cheap", "carrier:dear", "carrier:mid", "carrier:usd"]
    choice = book.routes("retail", "EUR", SELL, "+442071234567", AT_MS)
    assert [(r.carrier, r.trunk, r.buy.prefix, r.buy_cost_micros) for r in choice.routes] == [
        ("cheap", "PJSIP/cheap", "44", 10_000), ("mid", "PJSIP/mid", "4", 15_000)]
    assert {s.carrier: s.reason for s in choice.skipped} == {
        "dear": SkipReason.LOSS, "usd": SkipReason.NO_RATE, "nodeck": SkipReason.NO_RATE}
    assert "usd: buys in USD, the plan sells in EUR" in choice.detail()
    assert "nodeck: no buy deck imported" in choice.detail()
    # the cheap carrier blocks 4477 and is full at 2 channels; mid is then the only route
    blocked = book.routes("retail", "EUR", SELL, "+447712345", AT_MS, live_channels={"cheap": 0})
    assert [r.carrier for r in blocked.routes] == ["mid"]
    assert ("cheap", SkipReason.BLOCKED) in {(s.carrier, s.reason) for s in blocked.skipped}
    full = book.routes("retail", "EUR", SELL, "+442071234567", AT_MS, live_channels={"cheap": 2})
    assert [r.carrier for r in full.routes] == ["mid"]
    assert "cheap: 2 of 2 channels in use" in full.detail()
    # no carrier rates 1: no route
    none = book.routes("retail", "EUR", RateRow("1", "US", 20_000), "+12125550100", AT_MS)
    assert none.reason is DenyReason.NO_ROUTE and "cheap: no rate for 12125550100 in plan 'carrier:cheap'" \
        in none.detail()
    book.close()


def test_policy_state_and_decks_are_reloaded(engine: Engine, tmp_path: Path) -> None:
    setup(engine, tmp_path)
    clock = Clock()
    book = RouteBook(engine, clock, ttl_ms=5_000, check_interval_seconds=0)
    book.preload()
    assert [r.carrier for r in book.routes("retail", "EUR", SELL, "+4420", AT_MS).routes] == ["cheap", "mid"]
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        set_route_policy(session, "retail", "priority", allow_loss=True)
        set_enabled(session, "cheap", False)
    # cached until the ttl: the old policy and state serve
    assert [r.carrier for r in book.routes("retail", "EUR", SELL, "+4420", AT_MS).routes] == ["cheap", "mid"]
    clock.ms += 5_000
    choice = book.routes("retail", "EUR", SELL, "+4420", AT_MS)
    assert choice.policy is RoutePolicy.PRIORITY
    assert [r.carrier for r in choice.routes] == ["dear", "mid"]  # loss allowed, by priority; cheap disabled
    assert ("cheap", SkipReason.DISABLED) in {(s.carrier, s.reason) for s in choice.skipped}
    # a new buy deck (version bump) is loaded beside the old one and swapped in
    import_deck(sessions, deck(tmp_path, "mid2", "44,UK,0.012,1,1,\n"), "", carrier="mid", replace=True)
    book.routes("retail", "EUR", SELL, "+4420", AT_MS)  # starts the version check in the background
    gevent.sleep(0.5)
    mid = [r for r in book.routes("retail", "EUR", SELL, "+4420", AT_MS).routes if r.carrier == "mid"][0]
    assert (mid.buy.prefix, mid.buy.rate_micros) == ("44", 12_000)
    # a carrier enabled later is loaded in the background, never in the call
    with transaction(sessions) as session:
        set_enabled(session, "cheap", True)
    fresh = RouteBook(engine, clock)
    first = fresh.routes("retail", "EUR", SELL, "+4420", AT_MS)
    assert "cheap: buy deck still loading" in first.detail()
    gevent.sleep(0.5)
    assert "cheap" in [r.carrier for r in fresh.routes("retail", "EUR", SELL, "+4420", AT_MS).routes]
    book.close()
    fresh.close()


def test_one_decks_reload_leaves_the_other_decks_in_place(engine: Engine, tmp_path: Path) -> None:
    setup(engine, tmp_path)
    book = RouteBook(engine, Clock(), check_interval_seconds=3_600)
    book.preload()
    before = book.index
    cheap = before.deck("carrier:cheap")
    sessions = session_factory(engine)
    import_deck(sessions, deck(tmp_path, "mid2", "44,UK,0.012,1,1,\n4420,London,0.011,1,1,true\n"), "",
                carrier="mid", replace=True)
    assert book.check_versions() == ["carrier:mid"]
    assert book.index is not before and book.index.deck("carrier:cheap") is cheap  # shared, not reloaded
    # the index a call in flight holds still answers as before: the new one was built beside it
    assert before.lookup("carrier:mid", "+441612", AT_MS).prefix == "4"  # type: ignore[union-attr]
    choice = book.routes("retail", "EUR", SELL, "+441612", AT_MS)
    mid = [r for r in choice.routes if r.carrier == "mid"]
    assert mid, choice.detail()
    assert (mid[0].buy.prefix, mid[0].buy.rate_micros) == ("44", 12_000)
    london = book.routes("retail", "EUR", SELL, "+442079", AT_MS, live_channels={"cheap": 0})
    assert ("mid", SkipReason.BLOCKED) in {(s.carrier, s.reason) for s in london.skipped}
    assert "mid: destination 4420 (London) is blocked" in london.detail()
    assert book.check_versions() == []  # nothing changed: nothing reloaded
    book.close()


def test_buy_rows_follow_their_effective_dates(engine: Engine, tmp_path: Path) -> None:
    setup(engine, tmp_path)
    sessions = session_factory(engine)
    path = tmp_path / "dated.csv"
    path.write_text("prefix,destination,rate,effective_from,effective_to\n"
                    "44,UK,0.010,2026-01-01T00:00:00Z,2026-12-03T12:00:00Z\n"  # ends at the call's start
                    "44,UK,0.018,2026-12-03T12:00:00Z,\n"
                    "4420,London,0.005,2026-12-04T00:00:00Z,\n")  # not yet
    import_deck(sessions, path, "", carrier="cheap", replace=True)
    book = RouteBook(engine, Clock())
    book.preload()
    assert book.index.lookup("carrier:cheap", "+442071", AT_MS - 1).rate_micros == 10_000  # type: ignore[union-attr]
    cheap = [r for r in book.routes("retail", "EUR", SELL, "+442071", AT_MS).routes if r.carrier == "cheap"][0]
    assert (cheap.buy.prefix, cheap.buy.rate_micros) == ("44", 18_000)
    tomorrow = AT_MS + 86_400_000
    cheap = [r for r in book.routes("retail", "EUR", SELL, "+442071", tomorrow).routes if r.carrier == "cheap"][0]
    assert (cheap.buy.prefix, cheap.buy.rate_micros) == ("4420", 5_000)
    book.close()
