"""``billing-agent ledger``: prove from SQL alone that the money adds up."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from agent.adapters.sql.bundles_admin import check_bundles
from agent.adapters.sql.models import utcnow
from agent.adapters.sql.reconcile import Problem, check_ledger, check_spend
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.money import format_amount


@click.group()
def ledger() -> None:
    """The append-only ledger."""


def _problem_json(p: Problem) -> dict[str, Any]:
    out: dict[str, Any] = {"problem": p.problem, "account": p.account}
    if p.call is not None:
        out["call"] = p.call
    for key, value in p.detail.items():
        if key.endswith("_micros"):
            out[key.removesuffix("_micros")] = format_amount(int(value))
        else:
            out[key] = value
    return out


def _problem_line(p: Problem) -> str:
    details = ", ".join(f"{k} {v}" for k, v in _problem_json(p).items() if k not in ("problem", "account", "call"))
    who = f"{p.account}" + (f" call {p.call}" if p.call is not None else "")
    return f"{who}: {p.problem}" + (f" ({details})" if details else "")


@ledger.command()
@click.option("--grace-seconds", type=click.IntRange(min=0), default=300, show_default=True,
              help="A charge younger than this may still wait for its call record (CDR spool): "
                   "counted as pending, not as a difference.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="List at most this many problems of each kind (all are counted).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def check(ctx: click.Context, grace_seconds: int, limit: int, as_json: bool) -> None:
    """Prove that every balance equals the sum of its ledger, that reservations add up and that
    every settled call has exactly one charge (exit 1 on any difference).

    Bundles: every opened period's granted and used seconds equal the sums of its bundle_usage
    rows (granted = grant + rollover rows, used = -(use + adjust rows)), none is used beyond its
    grant, the seconds live calls hold add up (embedded SQL store), and each call's rating
    decision records the bundle seconds its usage rows took.

    Spend caps (embedded SQL store): every day's and month's counter equals what its calls were
    charged and hold."""
    context = app(ctx)
    with context.transaction() as session:
        report = check_ledger(session, now=utcnow(), grace=timedelta(seconds=grace_seconds), limit=limit)
        bundles = check_bundles(session, report, limit=limit, embedded=not context.config.redis.url)
        spend_counters = check_spend(session, report, limit) if not context.config.redis.url else 0
    if as_json:
        print_json({"accounts": report.accounts, "settled_calls": report.settled_calls,
                    "charges": report.charges, "pending_charges": report.pending_charges,
                    "bundle_periods": bundles.periods, "bundle_usage_rows": bundles.usage_rows,
                    "bundle_calls": bundles.calls, "spend_counters": spend_counters,
                    "ok": report.ok, "problem_count": report.problem_count,
                    "problems": [_problem_json(p) for p in report.problems]})
    else:
        for p in report.problems:
            click.echo(_problem_line(p))
        if report.ok:
            click.echo(f"ledger ok: {report.accounts} accounts, every balance equals the sum of its ledger; "
                       f"{report.settled_calls} settled calls, {report.charges} charges, each call charged once"
                       + (f" ({report.pending_charges} charges wait for their call record)"
                          if report.pending_charges else ""))
            if bundles.periods or bundles.usage_rows:
                click.echo(f"bundles ok: {bundles.periods} periods, each granted and used equal to its "
                           f"{bundles.usage_rows} usage rows, none below zero; {bundles.calls} calls' bundle "
                           "seconds match their rating decisions")
            if spend_counters:
                click.echo(f"spend caps ok: {spend_counters} day and month counters equal to what their calls "
                           "were charged and hold")
    if not report.ok:
        fail(f"{report.problem_count} difference(s) found", code=1)
