"""``billing-agent fx``: effective-dated FX rates (DESIGN §11): set one, import a CSV, list."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import click

from agent.adapters.sql import fx_rates as repo
from agent.cli.common import app, handle_errors, print_json
from agent.core.clock import parse_iso8601


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso8601(value, what=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (e.g. 2026-01-31, 2026-01-31T08:00:00Z or with an offset)") from None


def _json(view: repo.FxRateView) -> dict[str, Any]:
    return {"base": view.base, "quote": view.quote, "rate": view.rate,
            "effective_from": view.effective_from.isoformat(), "created_at": view.created_at.isoformat()}


@click.group()
def fx() -> None:
    """FX rates: a plan priced in another currency than its account's is converted at the rate in
    force at each call's start (direct pair PLAN/ACCOUNT, else the exact reciprocal of ACCOUNT/PLAN)."""


@fx.command(name="set")
@click.argument("base")
@click.argument("quote")
@click.argument("rate")
@click.option("--from", "effective_from", callback=_instant, metavar="ISO8601",
              help="In force from this instant (default: now); without an offset it is UTC.")
@click.pass_context
@handle_errors
def set_(ctx: click.Context, base: str, quote: str, rate: str, effective_from: datetime | None) -> None:
    """One BASE is worth RATE QUOTE (exact decimal, at most 10 decimals), e.g. `fx set USD EUR 0.92`."""
    with app(ctx).transaction() as session:
        view = repo.set_rate(session, base, quote, rate, effective_from)
    click.echo(f"{view.base}/{view.quote} = {view.rate} from {view.effective_from.isoformat()}")


@fx.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.pass_context
@handle_errors
def import_(ctx: click.Context, file: Path) -> None:
    """Import FILE (CSV: base,quote,rate,effective_from); every row is checked first and one bad
    row imports nothing (each error names FILE:LINE and the column)."""
    with app(ctx).transaction() as session:
        result = repo.import_csv(session, file, click.format_filename(file))
    already = f", {result.unchanged} already there" if result.unchanged else ""
    click.echo(f"imported {result.added} FX rates from {click.format_filename(file)}{already}")


@fx.command(name="list")
@click.option("--base", help="Only this base currency.")
@click.option("--quote", help="Only this quote currency.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, base: str | None, quote: str | None, as_json: bool) -> None:
    """Every FX rate, by pair and effective instant."""
    with app(ctx).transaction() as session:
        views = repo.list_rates(session, base=base, quote=quote)
    if as_json:
        print_json([_json(v) for v in views])
        return
    click.echo(f"{'PAIR':<8} {'RATE':>22}  EFFECTIVE FROM (UTC)")
    for v in views:
        click.echo(f"{v.base}/{v.quote:<4} {v.rate:>22}  {v.effective_from.isoformat()}")
