"""The migrations, the models and the DDL files given to DBAs describe one schema."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from agent.adapters.sql.ddl import render_ddl
from agent.adapters.sql.migrate import current_revision, head_revision, upgrade
from agent.adapters.sql.models import Base

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
CONTRACT_TABLES = {"tenants", "accounts", "rate_plans", "rates", "ledger_entries", "calls",
                   "call_legs", "rating_decisions"}


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_ddl_files_match_the_models(dialect: str) -> None:
    path = SQL_DIR / f"{dialect}.sql"
    assert path.read_text() == render_ddl(dialect), (
        f"{path} drifted from the models: regenerate with `billing-agent db ddl {dialect} > {path}`"
    )


def test_migrations_produce_exactly_the_models(engine: Engine) -> None:
    assert current_revision(engine) == head_revision(engine)
    assert CONTRACT_TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"migrations and models differ on {engine.dialect.name}: {diff}"


def test_upgrade_twice_is_harmless(engine: Engine) -> None:
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine)


def test_ddl_files_apply_on_sqlite(tmp_path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "dba.db")
    conn.executescript((SQL_DIR / "sqlite.sql").read_text())
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert CONTRACT_TABLES <= tables
