"""``billing-agent rerate``: price stored calls again with a plan's current rates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from agent.adapters.cdr.rerate import Change, RerateReport, rerate, rerate_buy
from agent.cli.balance_cache import redis_store
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.balance import StoreUnavailable
from agent.core.clock import parse_iso8601
from agent.core.money import format_amount


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_iso8601(value, what=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (e.g. 2026-01-31, 2026-01-31T08:00:00Z or with an offset)") from None


def _change_json(change: Change) -> dict[str, Any]:
    return {"call_id": change.call.call_id, "account_id": change.call.account_id,
            "destination": change.call.destination, "seq": change.seq,
            "old_cost": format_amount(change.call.cost_micros), "new_cost": format_amount(change.cost_micros),
            "adjustment": format_amount(change.adjustment_micros), "prefix": change.prefix,
            "rate_per_minute": format_amount(change.rate_micros), "billed_seconds": change.billed_seconds,
            "bundle_seconds": change.bundle_seconds, "bundle_seconds_returned": change.bundle_seconds_returned,
            "carrier": change.buy.carrier if change.buy else None,
            "old_buy_cost": format_amount(change.call.buy_cost_micros)
            if change.call.buy_cost_micros is not None else None,
            "new_buy_cost": format_amount(change.buy.cost_micros) if change.buy else None,
            "margin": format_amount(change.margin_micros) if change.margin_micros is not None else None}


def report_json(report: RerateReport) -> dict[str, Any]:
    return {
        ("carrier" if report.side == "buy" else "plan"): report.plan, "side": report.side, "dry_run": report.dry_run,
        "calls_checked": report.checked,
        "calls_changed": report.changed, "calls_applied": report.applied,
        "calls_already_rerated": report.already_done, "calls_unratable": report.unratable,
        "old_total": format_amount(report.old_total_micros), "new_total": format_amount(report.new_total_micros),
        "difference": format_amount(report.difference_micros),
        "bundle_seconds_returned": report.bundle_seconds_returned,
        "changes": [_change_json(c) for c in report.sample],
        "unratable": [{"call_id": c, "reason": r} for c, r in report.unratable_sample],
        "failures": [{"call_id": c, "reason": r} for c, r in report.failures],
    }


def _print(report: RerateReport) -> None:
    what = "would change" if report.dry_run else "changed"
    buy = report.side == "buy"
    click.echo(f"{'carrier' if buy else 'plan'} {report.plan}: {report.checked} calls checked, {report.changed} "
               f"{what}, {report.unratable} without a rate now")
    click.echo(f"{'buy cost' if buy else 'cost'} of the changed calls: {format_amount(report.old_total_micros)} -> "
               f"{format_amount(report.new_total_micros)} (difference {format_amount(report.difference_micros)})")
    if report.bundle_seconds_returned:
        click.echo(f"bundle seconds given back to their grants: {report.bundle_seconds_returned}")
    for change in report.sample:
        data = _change_json(change)
        bundle = f", bundle seconds {change.call.bundle_seconds} -> {change.bundle_seconds}" \
            if change.bundle_seconds_returned else (f", {change.bundle_seconds} s from bundles"
                                                    if change.bundle_seconds else "")
        if report.side == "buy":
            click.echo(f"  {data['call_id']}  {data['account_id']}  {data['destination']}  buy "
                       f"{data['old_buy_cost'] or '-'} -> {data['new_buy_cost']}  margin {data['margin']}  "
                       f"(decision {data['seq']})")
            continue
        click.echo(f"  {data['call_id']}  {data['account_id']}  {data['destination']}  {data['old_cost']} -> "
                   f"{data['new_cost']}  (decision {data['seq']}, ledger {data['adjustment']}{bundle})")
    if report.changed > len(report.sample):
        click.echo(f"  ... and {report.changed - len(report.sample)} more")
    for call_id, reason in report.unratable_sample:
        click.echo(f"  not re-rated: {call_id}: {reason}")
    if report.dry_run:
        click.echo("dry run: nothing was written")
    else:
        ledger = "" if report.side == "buy" else " and ledger adjustments"
        click.echo(f"applied {report.applied} new rating decisions{ledger}"
                   + (f"; {report.already_done} were re-rated by another run meanwhile" if report.already_done else ""))
    for call_id, reason in report.failures:
        click.echo(f"error: {call_id}: {reason}", err=True)


def refresh_accounts(ctx: click.Context, account_ids: list[str]) -> None:
    """Bring the shared balance cache (Redis) in step with the adjustments the ledger got; a
    Redis that cannot be reached is a warning: the ledger has them, rebuild-cache later."""
    store = redis_store(ctx) if account_ids else None
    if store is None:
        return
    try:
        for account_id in account_ids:
            store.refresh(account_id)
    except StoreUnavailable as exc:
        click.echo(f"warning: the ledger has the adjustments but Redis was not updated ({exc}); run "
                   f"`billing-agent accounts rebuild-cache` once Redis is back", err=True)
    finally:
        store.close()


@click.command(name="rerate")
@click.option("--plan", help="Rate plan whose calls are priced again with its current rates.")
@click.option("--carrier", help="Carrier whose calls' buy side is priced again with its current buy deck "
                                "(new decisions, no ledger entry).")
@click.option("--since", callback=_instant, required=True, metavar="ISO8601", help="Calls started at or after.")
@click.option("--until", callback=_instant, metavar="ISO8601", help="Calls started before.")
@click.option("--account", "account_id", help="Only this account.")
@click.option("--dry-run", is_flag=True, help="Show the totals and the changes; write nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def rerate_command(ctx: click.Context, plan: str | None, carrier: str | None, since: datetime,
                   until: datetime | None, account_id: str | None, dry_run: bool, as_json: bool) -> None:
    """Rate stored calls again; each changed call gets a new rating decision and a ledger
    adjustment of the difference (reference rerate:CALL:SEQ). Running it twice changes nothing.

    A call that used free-minute bundles keeps its bundle seconds (money pays the billed seconds
    beyond them at the corrected rate); when the corrected rate bills fewer seconds than the
    bundles covered, the difference goes back to the grant and period it came from.

    With --carrier instead of --plan, the buy side of the carrier's calls is priced again with its
    corrected buy deck: a new decision with the new buy cost and margin, no ledger entry."""
    if (plan is None) == (carrier is None):
        fail("give --plan (the sell side of a plan's calls) or --carrier (the buy side of a carrier's calls), "
             "one of them")
    if until is not None and until <= since:
        fail(f"--until {until.isoformat()} is not after --since {since.isoformat()}: the range "
             "[since, until) holds no call")
    if carrier is not None:
        report = rerate_buy(app(ctx).engine(), carrier, since, until=until, account_id=account_id, dry_run=dry_run)
    else:
        assert plan is not None
        report = rerate(app(ctx).engine(), plan, since, until=until, account_id=account_id, dry_run=dry_run)
    refresh_accounts(ctx, sorted(report.accounts))
    if as_json:
        print_json(report_json(report))
    else:
        _print(report)
    if report.failures:
        ctx.exit(1)
