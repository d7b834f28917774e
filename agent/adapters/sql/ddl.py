"""Render the schema as plain DDL for DBAs (sql/postgresql.sql, sql/mysql.sql, sql/sqlite.sql).

The files are generated from the models; a test regenerates them and fails on any drift.
Regenerate with ``billing-agent db ddl postgresql > sql/postgresql.sql`` (and mysql, sqlite).
"""

from __future__ import annotations

from sqlalchemy import Dialect
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from agent.adapters.sql.models import Base

DIALECTS: dict[str, Dialect] = {
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),
    "sqlite": sqlite.dialect(),
}


def render_ddl(dialect_name: str) -> str:
    try:
        dialect = DIALECTS[dialect_name]
    except KeyError:
        raise ValueError(
            f"unknown dialect {dialect_name!r} (known: {', '.join(DIALECTS)})"
        ) from None
    parts = [
        f"-- billing-agent schema for {dialect_name}: generated from agent/adapters/sql/models.py.\n"
        "-- Prefer `billing-agent db upgrade` (migrations); this file is for DBAs who review or\n"
        "-- apply DDL by hand. Do not edit: regenerate with `billing-agent db ddl "
        f"{dialect_name}`.\n"
    ]
    for table in Base.metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";\n")
        for index in sorted(table.indexes, key=lambda ix: ix.name or ""):
            parts.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";\n")
    text = "\n".join(parts)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
