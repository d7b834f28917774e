"""A balance store "world" for the contract tests: the SQL ledger plus a way to open stores.

``World.store()`` opens a new store instance with its own connections, as another PBX node
would. Redis worlds keep their ledger in SQLite (the ledger backend is covered by the SQL
worlds); each Redis world has its own key prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import Base, Call, LedgerEntry
from agent.adapters.sql.plans import create_plan
from agent.adapters.sql.reconcile import check_ledger
from agent.core.errors import NotFound
from agent.ports import BalanceStore

REDIS_URL = "redis://127.0.0.1:6379/0"
# "redis-cluster": the same store on a real 3-master + 3-replica Redis Cluster (conftest.py)
STORE_KINDS = ["redis", "redis-cluster", "sqlite", "postgresql", "mysql"]
REDIS_KINDS = {"redis": "redis_url_single", "redis-cluster": "redis_cluster_url",
               "redis-sentinel": "redis_sentinel_url"}  # kind -> the fixture giving its redis.url
T0 = 1_800_000_000_000  # a fixed instant (ms) for deterministic tests
UNIT = 1_000_000


def fresh_schema(engine: Engine) -> None:
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    upgrade(engine)


def clear_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        tenants = Base.metadata.tables["tenants"]
        conn.execute(tenants.update().values(parent_id=None))  # the tree refers to itself (MariaDB checks)
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@dataclass
class World:
    kind: str
    engine: Engine
    sessions: sessionmaker[Session]
    redis_prefix: str | None = None
    redis_url: str = REDIS_URL
    opened: list[BalanceStore] = field(default_factory=list)

    def store(self, sessions: sessionmaker[Session] | None = None) -> BalanceStore:
        """A new store instance with its own connections (another node)."""
        store: BalanceStore
        if self.kind in REDIS_KINDS:
            from agent.adapters.redis.store import RedisBalanceStore, make_client

            assert self.redis_prefix is not None
            store = RedisBalanceStore(make_client(self.redis_url, 2000), sessions or self.sessions,
                                      key_prefix=self.redis_prefix)
        else:
            store = SqlBalanceStore(sessions or session_factory(self.engine))
        self.opened.append(store)
        return store

    def account(self, account_id: str, *, balance: int = 0, credit: int = 0, max_calls: int | None = None,
                status: str = "active") -> str:
        with transaction(self.sessions) as s:
            try:
                repo.get_plan(s, "retail")
            except NotFound:
                create_plan(s, "retail", currency="EUR")
            repo.create_account(s, account_id, plan="retail", balance_micros=balance, credit_limit_micros=credit,
                                max_concurrent_calls=max_calls)
            if status != "active":
                repo.set_status(s, account_id, status)
        return account_id

    def sql_balance(self, account_id: str) -> int:
        with transaction(self.sessions) as s:
            return repo.view_account(s, account_id).balance_micros

    def entries(self, call_id: str) -> list[tuple[str, int, str]]:
        with transaction(self.sessions) as s:
            rows = s.execute(select(LedgerEntry.kind, LedgerEntry.amount_micros, LedgerEntry.reference)
                             .where(LedgerEntry.call_id == call_id).order_by(LedgerEntry.id))
            return [(k, a, r) for k, a, r in rows]

    def charges_total(self, account_id: str) -> int:
        with transaction(self.sessions) as s:
            return int(s.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_micros), 0)).where(
                LedgerEntry.account_id == account_id, LedgerEntry.call_id.is_not(None))) or 0)

    def record_settled_calls(self) -> None:
        """What the CDR path writes: a settled call record for every charged call."""
        now = datetime.now(UTC)
        with transaction(self.sessions) as s:
            charged = s.execute(select(LedgerEntry.call_id, LedgerEntry.account_id)
                                .where(LedgerEntry.kind == "charge")).all()
            known = set(s.scalars(select(Call.id)))
            for call_id, account_id in charged:
                if call_id not in known:
                    s.add(Call(id=call_id, node="n1", account_id=account_id, caller="", destination="100",
                               started_at=now, duration_ms=0, disposition="ANSWERED", hangup_cause="",
                               pbx="test", settled_at=now))

    def ledger_problems(self) -> list[Any]:
        from datetime import timedelta

        with transaction(self.sessions) as s:
            return check_ledger(s, now=datetime.now(UTC), grace=timedelta(0)).problems

    def wipe_redis(self) -> None:
        """Delete this world's keys: what a Redis restart without persistence (or a failover that
        lost writes) does. On a cluster the scan visits every master."""
        from agent.adapters.redis.store import make_client

        client = make_client(self.redis_url, 2000)
        for key in list(client.scan_iter(match=f"{self.redis_prefix}*", count=1000)):
            client.delete(key)
        client.close()

    def close(self) -> None:
        for store in self.opened:
            store.close()


@dataclass
class Engines:
    """One migrated database per backend for a whole test module (rows are cleared per test)."""

    tmp: Path
    by_backend: dict[str, Engine] = field(default_factory=dict)

    def dispose(self) -> None:
        for engine in self.by_backend.values():
            engine.dispose()


def postgres_redis_world(postgres_url: str, redis_url: str, **engine_options: Any) -> Iterator[World]:
    """A world of its own on a fresh PostgreSQL schema and the given Redis (a fixture's body:
    ``yield from``); ``engine_options`` go to ``create_engine`` (a lock timeout, say)."""
    from sqlalchemy import create_engine

    from agent.adapters.sql.engine import normalise_url

    engine = create_engine(normalise_url(postgres_url), **engine_options)
    fresh_schema(engine)
    world = World("redis", engine, session_factory(engine), f"test:{uuid.uuid4().hex[:10]}:", redis_url)
    try:
        yield world
    finally:
        world.close()
        world.wipe_redis()
        engine.dispose()


def world_for(request: pytest.FixtureRequest, engines_: Engines) -> Iterator[World]:
    engines, tmp = engines_.by_backend, engines_.tmp
    kind = request.param
    backend = "sqlite" if kind in REDIS_KINDS else kind
    if backend not in engines:
        if backend == "sqlite":
            url = f"sqlite:///{tmp / 'ledger.db'}"
        else:
            url = request.getfixturevalue("postgres_url" if backend == "postgresql" else "mysql_url")
        engine = make_engine(url)
        fresh_schema(engine)
        engines[backend] = engine
    engine = engines[backend]
    clear_rows(engine)
    prefix = None
    url = REDIS_URL
    if kind in REDIS_KINDS:
        url = request.getfixturevalue(REDIS_KINDS[kind])  # skips (or fails in CI) without that Redis
        prefix = f"test:{uuid.uuid4().hex[:10]}:"
    world = World(kind, engine, session_factory(engine), prefix, url)
    try:
        yield world
    finally:
        world.close()
        if prefix is not None:
            world.wipe_redis()
