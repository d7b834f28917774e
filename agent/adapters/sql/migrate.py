"""Apply the migrations shipped in sql/migrations (packaged as ``agent.sql_migrations``)."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from agent.core.errors import BillingError


def alembic_config(engine: Engine) -> AlembicConfig:
    location = resources.files("agent.sql_migrations")
    config = AlembicConfig()
    config.set_main_option("script_location", str(location))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def check_schema(engine: Engine) -> None:
    """Refuse to work on a database without the schema or at another revision than this agent's."""
    current = current_revision(engine)
    head = head_revision(engine)
    if current is None and not inspect(engine).has_table("accounts"):
        raise BillingError(
            f"database {engine.url.render_as_string(hide_password=True)} has no schema yet: "
            "run `billing-agent db upgrade` first"
        )
    if current != head:
        raise BillingError(
            f"database schema is at revision {current}, this agent needs {head}: "
            "run `billing-agent db upgrade`"
        )
