"""``billing-agent rates quote``: the rate a call gets, its cost line by line, or its max duration.

The same lookup and the same arithmetic as the daemon (``agent/core/ratetable.py`` and
``agent/core/rating.py``), on only the rows that could rate the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import click

from agent.adapters.cdr.export import fx_text
from agent.adapters.sql.accounts import view_account
from agent.adapters.sql.bundles_admin import GrantFigures, account_timezone
from agent.adapters.sql.fx_rates import conversion_from_sql
from agent.adapters.sql.rate_repository import load_table
from agent.cli.bundles import account_figures, local_iso
from agent.cli.common import AMOUNT, app, fail, handle_errors, print_json
from agent.core.bundles import covered_seconds, draw, max_seconds_with_bundle, money_micros_for_seconds, slots_for
from agent.core.clock import parse_iso8601
from agent.core.errors import InvalidInput
from agent.core.fx import Conversion
from agent.core.money import format_amount
from agent.core.ratetable import RateTable, Refusal, epoch_ms, format_instant
from agent.core.rating import (
    MAX_SECONDS_CAP,
    OPEN_END_MS,
    RateRow,
    billed_seconds,
    cost_micros_for_seconds,
    max_seconds,
    quote,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_at(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso8601(value, what="--at")
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (e.g. 2026-01-31T08:00:00Z, or with an offset)") from None


@click.command(name="quote")
@click.argument("number")
@click.option("--plan", help="Rate plan name (default: the plan of --account).")
@click.option("--seconds", type=click.IntRange(min=0), help="Answered duration in seconds: quote its cost.")
@click.option("--budget", type=AMOUNT, help="Money to spend: the longest call it pays for.")
@click.option("--at", "at", callback=_parse_at, metavar="ISO8601",
              help="Start of the call (default: now); without an offset it is UTC.")
@click.option("--account", "account_id", metavar="ACCOUNT",
              help="Rate for this account: its plan, and its free-minute bundles as they stand now (bundle "
                   "seconds first, then money; no connect fee when a bundle covers the call).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (amounts as decimal strings).")
@click.pass_context
@handle_errors
def quote_command(ctx: click.Context, number: str, plan: str | None, seconds: int | None, budget: int | None,
                  at: datetime | None, account_id: str | None, as_json: bool) -> None:
    """Rate NUMBER on a plan: its cost for --seconds N, or its max duration for --budget AMOUNT.

    With --account, the split of DESIGN §9: the bundles that cover NUMBER give what they have
    left (earliest to expire first), money pays the billed seconds beyond them.

    Exits 1 with the reason when the number cannot be rated (not a number, no rate, blocked).
    """
    if (seconds is None) == (budget is None):
        raise click.UsageError("give exactly one of --seconds N or --budget AMOUNT")
    if plan is None and account_id is None:
        raise click.UsageError("give --plan NAME or --account ACCOUNT")
    at_ms = epoch_ms(at if at is not None else datetime.now(UTC))
    if account_id is not None:
        plan = _account_plan(ctx, account_id, plan)
    assert plan is not None
    table = load_table(app(ctx).engine(), plan, for_number=number)
    found = table.lookup(number, at_ms)
    if isinstance(found, Refusal):
        fail(found.detail)
    head = _head(table, number, at_ms, found)
    if account_id is not None:
        split = _bundle_split(ctx, account_id, table, number, at_ms)
        conversion = _account_conversion(ctx, account_id, table, at_ms)
        if seconds is not None:
            _print_split_cost(head, table, found, seconds, split, as_json, conversion)
        else:
            assert budget is not None
            _print_split_max(head, table, found, budget, split, as_json, conversion)
    elif seconds is not None:
        _print_cost(head, table, found, seconds, as_json)
    else:
        assert budget is not None
        _print_max(head, table, found, budget, as_json)


def _account_plan(ctx: click.Context, account_id: str, plan: str | None) -> str:
    with app(ctx).transaction() as session:
        own, _ = account_timezone(session, account_id)
    if plan is not None and plan != own:
        raise InvalidInput(f"--plan {plan!r}: account {account_id!r} is rated on plan {own!r}")
    return own


def _account_conversion(ctx: click.Context, account_id: str, table: RateTable, at_ms: int) -> Conversion | None:
    """DESIGN §11: when the account pays in another currency than its plan's, the conversion in
    force at ``at_ms`` (as the daemon would use at a call's start); none: the quote is refused."""
    engine = app(ctx).engine()
    with app(ctx).transaction() as session:
        currency = view_account(session, account_id).currency
    if currency == table.currency:
        return None
    conversion = conversion_from_sql(engine, table.currency, currency, at_ms)
    if conversion is None:
        fail(f"no FX rate {table.currency}->{currency} (nor {currency}/{table.currency}) in force at "
             f"{format_instant(at_ms)}: plan {table.plan_name!r} is priced in {table.currency}, account "
             f"{account_id!r} pays in {currency} (the daemon would refuse the call: no_fx_rate)")
    return conversion


def _fx_json(conversion: Conversion | None, plan_micros: int) -> dict[str, Any]:
    if conversion is None:
        return {}
    return {"account_currency": conversion.currency, "fx_rate": fx_text(conversion.rate_e10, conversion.inverse),
            "fx_pair": f"{conversion.plan_currency}->{conversion.currency}",
            "account_cost": format_amount(conversion.charge(plan_micros))}


def _echo_fx(conversion: Conversion | None, plan_micros: int) -> None:
    if conversion is not None:
        click.echo(f"{'account pays':<40}{format_amount(conversion.charge(plan_micros)):>16} {conversion.currency} "
                   f"({conversion.describe()}, rounded up once)")


@dataclass(frozen=True)
class Draw:
    """One bundle period a call to the number would draw on, with what it has left."""

    figures: GrantFigures
    left_s: int


def _bundle_split(ctx: click.Context, account_id: str, table: RateTable, number: str, at_ms: int) -> list[Draw]:
    """The account's bundle periods covering the number at ``at_ms``, in draw order, each with
    what it has left now (the shared store's counters when Redis is configured)."""
    at = _EPOCH + timedelta(milliseconds=at_ms)
    _, timezone, figures, _ = account_figures(ctx, account_id, at)
    by_grant = {f.grant.grant_id: f for f in figures}
    slots = slots_for([f.grant for f in figures], table.normalise(number), at_ms, timezone)
    return [Draw(by_grant[slot.grant_id], max(by_grant[slot.grant_id].left_s, 0)) for slot in slots]


def _split_json(draws: list[Draw], covered_s: int, timezone: str) -> list[dict[str, Any]]:
    taken = draw([d.left_s for d in draws], covered_s)
    return [{"grant": d.figures.grant.grant_id, "bundle": d.figures.grant.bundle.name,
             "period_start": local_iso(d.figures.period_start_ms, timezone),
             "period_end": local_iso(d.figures.period_end_ms, timezone),
             "left_seconds": d.left_s, "covered_seconds": seconds} for d, seconds in zip(draws, taken, strict=True)]


def _print_split_cost(head: dict[str, Any], table: RateTable, row: RateRow, seconds: int, draws: list[Draw],
                      as_json: bool, conversion: Conversion | None = None) -> None:
    held = sum(d.left_s for d in draws)
    billed = billed_seconds(row, seconds)
    covered = covered_seconds(row, seconds, held)
    money = money_micros_for_seconds(row, seconds, held)
    fee = row.connect_fee_micros if billed and not covered else 0
    without = cost_micros_for_seconds(row, seconds)
    if as_json:
        print_json({**head, "account_bundles": True, "seconds": seconds, "billed_seconds": billed,
                    "bundle_seconds": covered, "money_seconds": billed - covered,
                    "connect_fee_waived": covered > 0 and row.connect_fee_micros > 0,
                    "connect_fee_charged": format_amount(fee), "money": format_amount(money - fee),
                    "cost": format_amount(money), "cost_without_bundles": format_amount(without),
                    "bundles": _split_json(draws, covered, table.timezone), **_fx_json(conversion, money)})
        return
    _echo_rate(head, table, row)
    click.echo(f"{'duration':<12}{seconds} s answered -> {billed} s billed")
    for item in _split_json(draws, covered, table.timezone):
        label = f"bundle {item['bundle']} (grant {item['grant']}, {item['left_seconds']} s left)"
        click.echo(f"{'':<12}{label:<52}{item['covered_seconds']:>6} s")
    click.echo(f"{'':<12}{'money at the rate':<52}{billed - covered:>6} s")
    if row.connect_fee_micros and covered:
        click.echo(f"{'connect fee':<12}waived: a bundle covers the call")
    elif fee:
        click.echo(f"{'connect fee':<40}{format_amount(fee):>16}")
    click.echo(f"{'money':<40}{format_amount(money - fee):>16}")
    click.echo(f"{'total':<40}{format_amount(money):>16} {table.currency} (without bundles "
               f"{format_amount(without)})")
    _echo_fx(conversion, money)


def _print_split_max(head: dict[str, Any], table: RateTable, row: RateRow, budget_micros: int, draws: list[Draw],
                     as_json: bool, conversion: Conversion | None = None) -> None:
    """``budget_micros`` is in the account's currency: converted, it buys ``plan_budget`` of the plan's."""
    held = sum(d.left_s for d in draws)
    account_budget = budget_micros
    if conversion is not None:
        budget_micros = conversion.plan_budget(budget_micros)
    best = max_seconds_with_bundle(row, budget_micros, held)
    capped = best == MAX_SECONDS_CAP
    covered = covered_seconds(row, best, held)
    cost = money_micros_for_seconds(row, best, held)
    if as_json:
        print_json({**head, "account_bundles": True, "budget": format_amount(budget_micros), "max_seconds": best,
                    "limit_ms": best * 1000, "allowed": best > 0, "capped": capped,
                    "bundle_seconds_left": held, "bundle_seconds": covered, "cost": format_amount(cost),
                    "without_bundles_max_seconds": max_seconds(row, budget_micros),
                    "bundles": _split_json(draws, covered, table.timezone), **_fx_json(conversion, cost),
                    **({"account_budget": format_amount(account_budget)} if conversion is not None else {})})
        return
    _echo_rate(head, table, row)
    if conversion is not None:
        click.echo(f"{'budget':<12}{format_amount(account_budget)} {conversion.currency} = "
                   f"{format_amount(budget_micros)} {table.currency} at {conversion.describe()}")
    click.echo(f"{'budget':<12}{format_amount(budget_micros)} {table.currency}, bundles covering the number: "
               f"{held} s left")
    if best == 0:
        click.echo(f"{'max':<12}0 s: deny")
    else:
        click.echo(f"{'max':<12}{best} s ({_human(best)}): {covered} s from bundles, money "
                   f"{format_amount(cost)} {table.currency} (without bundles {max_seconds(row, budget_micros)} s)")
        _echo_fx(conversion, cost)


def _head(table: RateTable, number: str, at_ms: int, row: RateRow) -> dict[str, Any]:
    return {
        "plan": table.plan_name,
        "plan_version": table.version,
        "currency": table.currency,
        "number": number,
        "normalised": table.normalise(number),
        "at": format_instant(at_ms),
        "prefix": row.prefix,
        "destination": row.destination,
        "rate_id": row.rate_id,
        "rate_per_minute": format_amount(row.rate_micros),
        "connect_fee": format_amount(row.connect_fee_micros),
        "initial_increment": row.initial_increment,
        "increment": row.increment,
        "minimum_seconds": row.minimum_seconds,
        "grace_seconds": row.grace_seconds,
        "effective_from": format_instant(row.effective_from_ms),
        "effective_to": None if row.effective_to_ms == OPEN_END_MS else format_instant(row.effective_to_ms),
        "weekdays": row.weekdays,
        "time_from": _hhmm(row.time_from_minute),
        "time_to": _hhmm(row.time_to_minute),
    }


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _print_cost(head: dict[str, Any], table: RateTable, row: RateRow, seconds: int, as_json: bool) -> None:
    q = quote(row, seconds * 1000)
    breakdown: list[dict[str, Any]] = []
    if q.connect_fee_micros:
        breakdown.append({"item": "connect_fee", "amount": format_amount(q.connect_fee_micros)})
    breakdown += [{"item": f"{block.kind}_block", "count": block.count, "seconds_each": block.seconds_each,
                   "from_second": block.from_second, "to_second": block.to_second,
                   "amount": format_amount(block.cost_micros)} for block in q.blocks]
    if as_json:
        print_json({**head, "seconds": q.seconds, "billed_seconds": q.billed_seconds, "waived": q.waived,
                    "minimum_applied": q.minimum_applied, "cost": format_amount(q.cost_micros),
                    "breakdown": breakdown})
        return
    _echo_rate(head, table, row)
    if q.waived:
        why = "no answered second" if q.seconds == 0 else f"within the grace period of {row.grace_seconds} s"
        click.echo(f"{'duration':<12}{q.seconds} s answered: {why}, nothing is charged (connect fee waived)")
    else:
        minimum = f" (raised to the minimum of {row.minimum_seconds} s)" if q.minimum_applied else ""
        click.echo(f"{'duration':<12}{q.seconds} s answered{minimum} -> {q.billed_seconds} s billed")
    if q.connect_fee_micros:
        click.echo(f"{'connect fee':<40}{format_amount(q.connect_fee_micros):>16}")
    for block in q.blocks:
        label = "first block" if block.kind == "initial" else "next blocks"
        span = f"{block.count} x {block.seconds_each} s ({block.from_second}-{block.to_second} s)"
        click.echo(f"{label:<12}{span:<28}{format_amount(block.cost_micros):>16}")
    click.echo(f"{'total':<40}{format_amount(q.cost_micros):>16} {table.currency}")


def _print_max(head: dict[str, Any], table: RateTable, row: RateRow, budget_micros: int, as_json: bool) -> None:
    best = max_seconds(row, budget_micros)
    capped = best == MAX_SECONDS_CAP
    cost = cost_micros_for_seconds(row, best)
    first_charged = cost_micros_for_seconds(row, row.grace_seconds + 1)
    following = None if capped or best == 0 else cost_micros_for_seconds(row, best + 1)
    if as_json:
        print_json({**head, "budget": format_amount(budget_micros), "max_seconds": best, "limit_ms": best * 1000,
                    "allowed": best > 0, "capped": capped, "cost": format_amount(cost),
                    "next_second_cost": None if following is None else format_amount(following),
                    "first_charged_second_cost": format_amount(first_charged)})
        return
    _echo_rate(head, table, row)
    click.echo(f"{'budget':<12}{format_amount(budget_micros)} {table.currency}")
    if best == 0:
        click.echo(f"{'max':<12}0 s: deny. The first charged second (second {row.grace_seconds + 1}: connect fee, "
                   f"minimum and first block) costs {format_amount(first_charged)}")
    elif capped:
        click.echo(f"{'max':<12}{best} s (no limit: once the connect fee is paid every second is free)")
    else:
        click.echo(f"{'max':<12}{best} s ({_human(best)}), costing {format_amount(cost)}; "
                   f"one second more would cost {format_amount(following or 0)}")


def _echo_rate(head: dict[str, Any], table: RateTable, row: RateRow) -> None:
    zone = "" if table.timezone == "UTC" else f" ({_local(head['at'], table.timezone)} {table.timezone})"
    click.echo(f"{'plan':<12}{table.plan_name} ({table.currency}), version {table.version}")
    click.echo(f"{'number':<12}{head['number']} -> {head['normalised']}")
    click.echo(f"{'at':<12}{head['at']}{zone}")
    name = f" {row.destination}" if row.destination else ""
    click.echo(f"{'rate':<12}prefix {row.prefix}{name}: {head['rate_per_minute']} {table.currency}/min, "
               f"connect fee {head['connect_fee']}, blocks {row.initial_increment} s then {row.increment} s, "
               f"minimum {row.minimum_seconds} s, grace {row.grace_seconds} s")
    limits = []
    if row.effective_from_ms or head["effective_to"]:
        limits.append(f"effective {head['effective_from']} to {head['effective_to'] or 'open-ended'}")
    if row.weekdays or (row.time_from_minute, row.time_to_minute) != (0, 1440):
        days = f"ISO weekdays {row.weekdays}" if row.weekdays else "every day"
        limits.append(f"{days} {head['time_from']}-{head['time_to']} {table.timezone}")
    if limits:
        click.echo(f"{'':<12}{'; '.join(limits)}")


def _local(at_iso: str, timezone: str) -> str:
    return parse_iso8601(at_iso).astimezone(ZoneInfo(timezone)).isoformat()


def _human(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours} h " if hours else "") + f"{minutes} min {secs} s"
