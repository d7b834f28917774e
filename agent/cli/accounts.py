"""``billing-agent accounts``: create, show, list, top up, adjust, suspend, resume."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from agent.adapters.sql import accounts as repo
from agent.adapters.sql.tenants import subtree_ids
from agent.cli.balance_cache import live_state, rebuild_cache, sync_account
from agent.cli.common import AMOUNT, SIGNED_AMOUNT, app, handle_errors, print_json
from agent.cli.low_balance import account_threshold, describe, set_account_low_balance, threshold_json
from agent.core.money import format_amount


def account_json(view: repo.AccountView) -> dict[str, Any]:
    return {
        "id": view.id,
        "tenant": view.tenant,
        "plan": view.plan,
        "currency": view.currency,
        "type": view.account_type,
        "status": view.status,
        "balance": format_amount(view.balance_micros),
        "reserved": format_amount(view.reserved_micros),
        "available": format_amount(view.available_micros),
        "credit_limit": format_amount(view.credit_limit_micros),
        "max_concurrent_calls": view.max_concurrent_calls,
        "created_at": view.created_at.isoformat(),
        "suspended_by_rule": view.suspended_by_rule,
        "suspended_at": view.suspended_at.isoformat() if view.suspended_at else None,
    }


MONEY_KEYS = ("balance", "reserved", "available", "credit_limit")


def _print_account(view: repo.AccountView, extra: dict[str, str] | None = None) -> None:
    data = account_json(view)
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key in ("suspended_by_rule", "suspended_at") and value is None:
            continue
        shown = "unlimited" if value is None and key == "max_concurrent_calls" else value
        if key in MONEY_KEYS:
            shown = f"{value} {view.currency}"
        click.echo(f"{key.replace('_', ' '):<{width}}  {shown}")
    for key, value in (extra or {}).items():
        click.echo(f"{key:<{width}}  {value}")


@click.group()
def accounts() -> None:
    """Customer accounts and their balances (every change is a ledger entry)."""


@accounts.command()
@click.argument("account_id")
@click.option("--plan", required=True, help="Rate plan name.")
@click.option("--balance", type=AMOUNT, default=0, help="Opening balance (a ledger entry).")
@click.option("--credit-limit", type=AMOUNT, default=0, help="Credit limit (postpaid accounts).")
@click.option("--currency", help="ISO 4217 code; defaults to the plan's currency.")
@click.option("--type", "account_type", type=click.Choice(repo.ACCOUNT_TYPES),
              help="prepaid (default) or postpaid (default when a credit limit is given).")
@click.option("--max-calls", type=click.IntRange(min=1), help="Max concurrent calls across all nodes.")
@click.option("--tenant", default=repo.DEFAULT_TENANT, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def create(ctx: click.Context, account_id: str, plan: str, balance: int, credit_limit: int,
           currency: str | None, account_type: str | None, max_calls: int | None, tenant: str,
           as_json: bool) -> None:
    """Create ACCOUNT_ID (the PBX account code)."""
    with app(ctx).transaction() as session:
        view = repo.create_account(session, account_id, plan=plan, currency=currency,
                                   balance_micros=balance, credit_limit_micros=credit_limit,
                                   account_type=account_type, max_concurrent_calls=max_calls,
                                   tenant=tenant)
    if as_json:
        print_json(account_json(view))
    else:
        click.echo(f"created {view.account_type} account {view.id} on plan {view.plan}, "
                   f"balance {format_amount(view.balance_micros)} {view.currency}")


@accounts.command()
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, account_id: str, as_json: bool) -> None:
    """Balance, reserved, available, credit limit, status of ACCOUNT_ID."""
    with app(ctx).transaction() as session:
        view = repo.view_account(session, account_id)
        threshold = account_threshold(session, account_id)
    state, source = live_state(ctx, account_id)
    if state is not None:
        # Redis holds every node's reservations: reserved = what live calls hold (their next
        # slices and what their nibbles took, not yet charged), so available = balance + credit - reserved.
        held = view.balance_micros + view.credit_limit_micros - state.available_micros
        view = dataclasses.replace(view, reserved_micros=held)
    if as_json:
        data = account_json(view)
        data["live_calls"] = state.live_calls if state is not None else None
        data["source"] = source
        data.update(threshold_json(threshold))
        print_json(data)
    else:
        _print_account(view, {"low balance alert": describe(threshold)})


@accounts.command(name="list")
@click.option("--status", type=click.Choice(["active", "suspended", "closed"]))
@click.option("--plan")
@click.option("--limit", type=click.IntRange(min=1))
@click.option("--tenant", help="Only the accounts of this tenant and the tenants below it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, status: str | None, plan: str | None, limit: int | None, tenant: str | None,
          as_json: bool) -> None:
    """List accounts."""
    with app(ctx).transaction() as session:
        views = repo.list_accounts(session, status=status, plan=plan, limit=limit,
                                   tenant_ids=subtree_ids(session, tenant) if tenant else None)
    if as_json:
        print_json([account_json(v) for v in views])
        return
    click.echo(f"{'ID':<20} {'STATUS':<10} {'TYPE':<9} {'PLAN':<12} {'BALANCE':>16} {'AVAILABLE':>16} CUR  TENANT")
    for v in views:
        click.echo(f"{v.id:<20} {v.status:<10} {v.account_type:<9} {v.plan:<12} "
                   f"{format_amount(v.balance_micros):>16} {format_amount(v.available_micros):>16} "
                   f"{v.currency}  {v.tenant}")


def _echo_posting(posting: repo.Posting, what: str, as_json: bool) -> None:
    if as_json:
        print_json({
            "account": posting.account_id,
            "kind": posting.kind,
            "amount": format_amount(posting.amount_micros),
            "balance_after": format_amount(posting.balance_after_micros),
            "reference": posting.reference,
            "created": posting.created,
        })
    elif posting.created:
        click.echo(f"{what} {format_amount(posting.amount_micros)} on {posting.account_id}: "
                   f"balance {format_amount(posting.balance_after_micros)}")
    else:
        click.echo(f"already applied: {posting.reference} ({what} "
                   f"{format_amount(posting.amount_micros)}); nothing changed")


@accounts.command()
@click.argument("account_id")
@click.argument("amount", type=AMOUNT)
@click.option("--reference", help="Payment reference; the same reference credits once.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def topup(ctx: click.Context, account_id: str, amount: int, reference: str | None, as_json: bool) -> None:
    """Credit AMOUNT to ACCOUNT_ID (idempotent per --reference)."""
    with app(ctx).transaction() as session:
        posting = repo.topup(session, account_id, amount, reference)
    sync_account(ctx, account_id)
    _echo_posting(posting, "topped up", as_json)


@accounts.command()
@click.argument("account_id")
@click.argument("amount", type=SIGNED_AMOUNT)
@click.option("--reason", required=True, help="Why (kept in the ledger).")
@click.option("--reference", help="Idempotency reference.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def adjust(ctx: click.Context, account_id: str, amount: int, reason: str, reference: str | None,
           as_json: bool) -> None:
    """Post a signed AMOUNT correction to ACCOUNT_ID.

    Put options first, then -- before a negative amount: adjust A --reason R -- -1.50
    """
    with app(ctx).transaction() as session:
        posting = repo.adjust(session, account_id, amount, reason=reason, reference=reference)
    sync_account(ctx, account_id)
    _echo_posting(posting, "adjusted", as_json)


def _status_command(name: str, status: str, help_text: str) -> click.Command:
    @click.command(name=name, help=help_text)
    @click.argument("account_id")
    @click.pass_context
    @handle_errors
    def command(ctx: click.Context, account_id: str) -> None:
        with app(ctx).transaction() as session:
            view = repo.set_status(session, account_id, status)
        sync_account(ctx, account_id)
        click.echo(f"account {view.id} is {view.status}")

    return command


accounts.add_command(_status_command("suspend", "suspended", "Refuse new calls of ACCOUNT_ID."))
accounts.add_command(_status_command("resume", "active", "Allow calls of ACCOUNT_ID again."))
accounts.add_command(rebuild_cache)
accounts.add_command(set_account_low_balance)
