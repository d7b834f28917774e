"""``billing-agent limits``: an account's spend caps (DESIGN §8) and what today and this month
have used of them."""

from __future__ import annotations

import time
from typing import Any

import click
from sqlalchemy import select

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.models import RatePlan, SpendPeriod
from agent.cli.balance_cache import store_spend_counters, sync_account
from agent.cli.common import app, handle_errors, print_json
from agent.core.budgets import SpendLimits, spend_periods
from agent.core.money import MoneyError, format_amount, parse_amount


class CapType(click.ParamType):  # type: ignore[type-arg]
    """An amount, or ``none`` to remove the cap."""

    name = "amount|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if isinstance(value, int) or value is None:
            return value
        if str(value).strip().lower() in ("none", "off", "unlimited"):
            return None
        try:
            amount = parse_amount(str(value))
        except MoneyError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)
        if amount < 0:
            self.fail(f"{value!r}: a cap must not be negative", param, ctx)
        return amount


CAP = CapType()


@click.group()
def limits() -> None:
    """Spend caps beside the balance: max call cost, daily and monthly spend."""


@limits.command("set")
@click.argument("account_id")
@click.option("--max-call-cost", type=CAP, default=None, help="Most one call may cost ('none' removes it).")
@click.option("--daily", type=CAP, default=None, help="Most the account may spend per calendar day.")
@click.option("--monthly", type=CAP, default=None, help="Most the account may spend per calendar month.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def set_limits(ctx: click.Context, account_id: str, max_call_cost: Any, daily: Any, monthly: Any,
               as_json: bool) -> None:
    """Set (or remove with 'none') ACCOUNT_ID's caps; days and months are read in the timezone of
    its rate plan. Caps apply to calls authorized from now on; max call cost also binds calls in
    progress at their next nibble."""
    given = {param: ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT
             for param in ("max_call_cost", "daily", "monthly")}
    changes = {name: value for name, param, value in (("max_call_cost_micros", "max_call_cost", max_call_cost),
                                                      ("daily_micros", "daily", daily),
                                                      ("monthly_micros", "monthly", monthly)) if given[param]}
    if not changes:
        raise click.UsageError("give at least one of --max-call-cost, --daily, --monthly")
    with app(ctx).transaction() as session:
        view = repo.set_limits(session, account_id, **changes)
    sync_account(ctx, account_id)
    _show(ctx, view, as_json)


@limits.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """ACCOUNT_ID's caps and what today and this month used of them (spent by ended calls and
    held by calls in progress)."""
    with app(ctx).transaction() as session:
        view = repo.view_account(session, account_id)
    _show(ctx, view, as_json)


def _show(ctx: click.Context, view: repo.AccountView, as_json: bool) -> None:
    with app(ctx).transaction() as session:
        timezone = session.scalar(select(RatePlan.timezone).where(RatePlan.name == view.plan)) or "UTC"
        periods = spend_periods(timezone, int(time.time() * 1000))
        rows = {(row.kind, row.start_ms): row for row in session.scalars(
            select(SpendPeriod).where(SpendPeriod.account_id == view.id))}
    caps: SpendLimits = view.limits
    live, source = store_spend_counters(ctx, view.id, periods)
    figures = live if live is not None else {
        kind: (row.spent_micros, row.held_micros) if (row := rows.get((kind, start))) is not None else (0, 0)
        for kind, start in (("day", periods.day_start_ms), ("month", periods.month_start_ms))}
    data: dict[str, Any] = {"account": view.id, "currency": view.currency, "timezone": timezone, "source": source}
    for name, cap, kind in (("max_call_cost", caps.max_call_cost_micros, ""),
                            ("daily", caps.daily_micros, "day"), ("monthly", caps.monthly_micros, "month")):
        entry: dict[str, Any] = {"cap": None if cap is None else format_amount(cap)}
        if kind:
            spent, held = figures[kind]
            entry.update(spent=format_amount(spent), held=format_amount(held),
                         left=None if cap is None else format_amount(max(cap - spent - held, 0)))
        data[name] = entry
    if as_json:
        print_json(data)
        return
    click.echo(f"account {view.id} ({view.currency}, days and months in {timezone})")
    for name in ("max_call_cost", "daily", "monthly"):
        entry = data[name]
        shown = entry["cap"] or "none"
        if name == "max_call_cost":
            click.echo(f"  max call cost  {shown}")
        else:
            left = entry["left"] if entry["left"] is not None else "-"
            click.echo(f"  {name:<13}  {shown}  (spent {entry['spent']}, held by live calls {entry['held']}, "
                       f"left {left})")
