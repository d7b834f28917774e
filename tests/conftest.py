"""Shared fixtures: real PostgreSQL, MariaDB and Redis on loopback, and SQLite.

Each test session creates its own throw-away database on PostgreSQL and MariaDB (so that parallel
runs never see each other's rows) and a unique Redis key prefix. In CI (CI=true) a service that
cannot be reached fails the run; elsewhere the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.sql.engine import make_engine, session_factory
from agent.adapters.sql.migrate import upgrade

if TYPE_CHECKING:
    from tests.redis_servers import Cluster, SentinelSetup

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN_URL = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SESSION_TAG = uuid.uuid4().hex[:8]


def service_unavailable(name: str, exc: BaseException) -> None:
    """Fail in CI, skip with the reason on a laptop."""
    message = f"{name} is not reachable: {type(exc).__name__}: {exc}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


def _server_engine(admin_url: str, backend: str) -> Iterator[str]:
    """Create a database for this test session on a server and yield its URL."""
    name = f"ba_test_{SESSION_TAG}"
    try:
        admin = make_engine(admin_url, connect_timeout_seconds=3)
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any driver error means "not reachable"
        service_unavailable(backend, exc)
    autocommit = admin.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with autocommit.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from _server_engine(PG_ADMIN_URL, "postgresql")


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    yield from _server_engine(MYSQL_ADMIN_URL, "mariadb")


def _fresh_schema(engine: Engine) -> None:
    """Drop every table and apply the migrations from scratch."""
    from agent.adapters.sql.models import Base

    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    upgrade(engine)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
    elif request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = request.getfixturevalue("mysql_url")
    eng = make_engine(url)
    _fresh_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'test.db'}")
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def redis_client() -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_unavailable("redis", exc)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: object) -> Iterator[str]:
    """A key prefix no other test (or parallel run) uses; its keys are deleted afterwards."""
    prefix = f"test:{SESSION_TAG}:{uuid.uuid4().hex[:6]}:"
    yield prefix
    for key in redis_client.scan_iter(match=f"{prefix}*", count=1000):  # type: ignore[attr-defined]
        redis_client.delete(key)  # type: ignore[attr-defined]


@pytest.fixture
def redis_url_single(redis_client: object) -> str:
    """The loopback Redis (one server) as a ``redis.url``."""
    return REDIS_URL


def _redis_server_missing() -> None:
    import shutil

    if shutil.which("redis-server") is None:
        service_unavailable("redis-server (to start a cluster or sentinel)", FileNotFoundError("not on PATH"))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real 3-master + 3-replica Redis Cluster on free loopback ports, started once per session
    (about 2 s) and stopped by PID at the end. A test that kills a node restarts it before it ends."""
    from tests.redis_servers import start_cluster

    _redis_server_missing()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: Cluster) -> str:
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """One master, one replica, one Sentinel (quorum 1), started once per session."""
    from tests.redis_servers import start_sentinel

    _redis_server_missing()
    setup = start_sentinel(tmp_path_factory.mktemp("redis-sentinel"))
    yield setup
    setup.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: SentinelSetup) -> str:
    return redis_sentinel.url
