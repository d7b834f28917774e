"""``billing-agent rates import FILE.csv --plan NAME|--carrier NAME [--replace]`` (format: rates/README.md)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from agent.adapters.sql.rate_import import DeckRejected, Progress, import_deck
from agent.cli.common import app, fail, handle_errors

SHOWN_ERRORS = 100


@click.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option("--plan", help="Rate plan to import into.")
@click.option("--carrier", help="Import the buy deck of this carrier (`carriers create`) instead of a plan.")
@click.option("--replace", is_flag=True,
              help="Replace all the plan's rates atomically (default: add to them).")
@click.option("--create-plan", is_flag=True, help="Create the plan if it does not exist.")
@click.option("--currency", help="The deck's currency: checked against the plan's, given to a plan made "
                                 "by --create-plan (default: billing.default_currency).")
@click.option("--tenant", help="The tenant the plan belongs to (checked; a plan made by --create-plan is its).")
@click.pass_context
@handle_errors
def import_command(ctx: click.Context, file: Path, plan: str | None, carrier: str | None, replace: bool,
                   create_plan: bool, currency: str | None, tenant: str | None) -> None:
    """Import the rate deck FILE (CSV, UTF-8, ',' or ';') into a plan.

    Every row is checked first and every error is reported with its line and column; one bad
    row imports nothing. The import is one transaction, so running daemons see the old plan or
    the new one, never a mix.
    """
    if (plan is None) == (carrier is None):
        fail("give --plan NAME (a sell plan) or --carrier NAME (a carrier's buy deck), one of them")
    if carrier is not None and create_plan:
        fail("--create-plan is for sell plans: a carrier's buy deck is made by its first import")
    context = app(ctx)
    source = click.format_filename(file)
    try:
        with _progress_bar(file) as progress:
            result = import_deck(context.sessions(), file, plan or "", replace=replace, create_missing_plan=create_plan,
                                 currency=currency, default_currency=context.config.billing.default_currency,
                                 source=source, max_errors=SHOWN_ERRORS, progress=progress, tenant=tenant,
                                 carrier=carrier)
    except OSError as exc:  # unreadable, vanished, or a directory swapped in since click checked it
        fail(f"cannot read {source}: {exc.strerror or exc}")
    except DeckRejected as exc:
        for error in exc.errors:
            click.echo(error.describe(exc.source), err=True)
        hidden = exc.error_count - len(exc.errors)
        if hidden:
            click.echo(f"... and {hidden} more errors not shown", err=True)
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    created = " (plan created)" if result.plan_created else ""
    replaced = f", replacing {result.rows_replaced}" if replace else ""
    click.echo(f"imported {result.rows_imported} rates into plan {result.plan}{created}{replaced}: "
               f"version {result.version}, {result.seconds:.2f} s")


@contextmanager
def _progress_bar(file: Path) -> Iterator[Progress | None]:
    """A bar on stderr for files big enough to wait for, and only when stderr is a terminal."""
    if not sys.stderr.isatty() or file.stat().st_size < 1_000_000:
        yield None
        return
    bars: dict[str, Any] = {}

    def advance(phase: str, done_bytes: int, total_bytes: int) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.render_finish()
            label = "checking" if phase == "validate" else "writing "
            bars[phase] = click.progressbar(length=total_bytes, label=label, file=sys.stderr)
            bars[phase].render_progress()
        bar = bars[phase]
        bar.update(done_bytes - bar.pos)

    try:
        yield advance
    finally:
        for bar in bars.values():
            bar.render_finish()
