"""``billing-agent db``: schema migrations and DDL."""

from __future__ import annotations

import click

from agent.cli.common import app, handle_errors


@click.group()
def db() -> None:
    """Database schema: apply migrations, print DDL."""


@db.command()
@click.pass_context
@handle_errors
def upgrade(ctx: click.Context) -> None:
    """Create or migrate the schema to the newest revision (safe to run again)."""
    from agent.adapters.sql.migrate import current_revision, head_revision
    from agent.adapters.sql.migrate import upgrade as do_upgrade

    engine = app(ctx).engine(require_schema=False)
    before = current_revision(engine)
    do_upgrade(engine)
    after = current_revision(engine)
    where = engine.url.render_as_string(hide_password=True)
    if before == after:
        click.echo(f"{where}: schema already at revision {after} (head {head_revision(engine)})")
    else:
        click.echo(f"{where}: schema upgraded from {before or 'empty'} to {after}")


@db.command()
@click.argument("dialect", type=click.Choice(["postgresql", "mysql", "sqlite"]))
def ddl(dialect: str) -> None:
    """Print the schema as plain DDL for DIALECT (what sql/DIALECT.sql holds)."""
    from agent.adapters.sql.ddl import render_ddl

    click.echo(render_ddl(dialect), nl=False)
