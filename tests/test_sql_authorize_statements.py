"""The embedded SQL store's authorization is in every call's post-dial delay: it runs a fixed,
short list of statements (no ORM entity loaded or flushed for an account without bundles or
caps), and counts the live calls only for an account with a call limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.plans import create_plan

T0 = 1_800_000_000_000
UNIT = 1_000_000


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    found = make_engine(f"sqlite:///{tmp_path}/ledger.db")
    upgrade(found)
    with transaction(session_factory(found)) as s:
        create_plan(s, "retail", currency="EUR")
        repo.create_account(s, "plain", plan="retail", balance_micros=10 * UNIT)
        repo.create_account(s, "limited", plan="retail", balance_micros=10 * UNIT, max_concurrent_calls=1)
    yield found
    found.dispose()


def _statements(engine: Engine, run: Any) -> list[str]:
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(" ".join(statement.split())[:60])

    event.listen(engine, "before_cursor_execute", record)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return seen


def test_an_authorization_is_six_statements_and_a_call_limit_adds_the_count(engine: Engine) -> None:
    store = SqlBalanceStore(session_factory(engine))
    plain = _statements(engine, lambda: store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000))
    assert [s.split()[0] for s in plain] == ["BEGIN", "SELECT", "SELECT", "SELECT", "INSERT", "UPDATE"], plain
    assert not any("count(" in s.lower() for s in plain)
    limited = _statements(engine, lambda: store.authorize("limited", "c2", "n1", UNIT, UNIT, T0, 60_000))
    assert sum("count(" in s.lower() for s in limited) == 1, limited
    second = store.authorize("limited", "c3", "n1", UNIT, UNIT, T0 + 1, 60_000)
    assert (second.allowed, str(second.reason)) == (False, "max_calls")  # the count still binds
    assert store.account_state("plain").reserved_micros == UNIT


def test_a_replayed_authorization_writes_nothing(engine: Engine) -> None:
    store = SqlBalanceStore(session_factory(engine))
    first = store.authorize("plain", "c1", "n1", UNIT, UNIT, T0, 60_000)
    again = _statements(engine, lambda: store.authorize("plain", "c1", "n1", 2 * UNIT, UNIT, T0 + 5, 60_000))
    assert not any(s.split()[0] in ("INSERT", "UPDATE") for s in again), again
    replay = store.authorize("plain", "c1", "n1", 2 * UNIT, UNIT, T0 + 5, 60_000)
    assert (replay.replayed, replay.granted_micros) == (True, first.granted_micros)
    assert store.account_state("plain").reserved_micros == UNIT
