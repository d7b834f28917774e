"""``billing-agent tenants``: the reseller tree (DESIGN §11): create, list, show, move."""

from __future__ import annotations

from typing import Any

import click

from agent.adapters.sql import tenants as repo
from agent.cli.common import AMOUNT, app, handle_errors, print_json
from agent.core.money import format_amount


def _money(micros: int | None) -> str | None:
    return None if micros is None else format_amount(micros)


def tenant_json(view: repo.TenantView, *, tree: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": view.name, "parent": view.parent, "level": view.level, "currency": view.currency,
        "account": view.account_id, "balance": _money(view.balance_micros),
        "credit_limit": _money(view.credit_limit_micros), "account_currency": view.account_currency,
        "accounts": view.accounts, "plans": list(view.plans), "created_at": view.created_at.isoformat(),
    }
    if tree:
        data["children"] = [tenant_json(child, tree=True) for child in view.children]
    return data


def _own(view: repo.TenantView) -> str:
    if view.account_id is None:
        return "operator (no parent to pay)"
    credit = f", credit limit {_money(view.credit_limit_micros)}" if view.credit_limit_micros else ""
    return f"account {view.account_id}: balance {_money(view.balance_micros)} {view.account_currency}{credit}"


@click.group()
def tenants() -> None:
    """The tenant tree: the operator (`default`, level 1), resellers and sub-resellers (4 levels at
    most). A reseller pays its parent from its own account `tenant:NAME`, kept in the parent tenant."""


@tenants.command()
@click.argument("name")
@click.option("--parent", required=True, help="The parent tenant (`default`: the operator).")
@click.option("--currency", help="ISO 4217 code of the reseller and its account (default: the parent's).")
@click.option("--credit-limit", type=AMOUNT, default=0, help="Its account's credit limit (a postpaid reseller).")
@click.option("--balance", type=AMOUNT, default=0, help="Its account's opening balance (a ledger entry).")
@click.option("--plan", help="The parent's plan the reseller's account is rated on (default: the parent's only plan).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def create(ctx: click.Context, name: str, parent: str, currency: str | None, credit_limit: int, balance: int,
           plan: str | None, as_json: bool) -> None:
    """Create the reseller tenant NAME under PARENT and its account `tenant:NAME` in PARENT."""
    context = app(ctx)
    with context.transaction() as session:
        view = repo.create_tenant(session, name, parent=parent, currency=currency, plan=plan,
                                  balance_micros=balance, credit_limit_micros=credit_limit,
                                  default_currency=context.config.billing.default_currency)
    if as_json:
        print_json(tenant_json(view))
    else:
        click.echo(f"created tenant {view.name} (level {view.level}, {view.currency}) under {view.parent}; "
                   f"{_own(view)}")


@tenants.command()
@click.argument("name")
@click.option("--parent", required=True, help="The new parent tenant.")
@click.option("--plan", help="The new parent's plan its account is rated on (default: the parent's only plan).")
@click.pass_context
@handle_errors
def move(ctx: click.Context, name: str, parent: str, plan: str | None) -> None:
    """Put NAME (and its subtree) under another PARENT, its own account with it (into PARENT, on
    one of PARENT's plans); refuses a cycle and a fifth level."""
    with app(ctx).transaction() as session:
        view = repo.move_tenant(session, name, parent=parent, plan=plan)
    click.echo(f"tenant {view.name} is now under {view.parent} (level {view.level})")


@tenants.command(name="list")
@click.option("--tenant", help="Only this tenant and the tenants below it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """Every tenant, parents before children."""
    with app(ctx).transaction() as session:
        views = repo.list_tenants(session, under=tenant)
    if as_json:
        print_json([tenant_json(v) for v in views])
        return
    click.echo(f"{'NAME':<24} {'LVL':>3} {'PARENT':<16} {'CUR':<4} {'ACCOUNT':<24} {'BALANCE':>16} {'ACCTS':>6}")
    for v in views:
        indent = "  " * (v.level - 1)
        click.echo(f"{indent + v.name:<24} {v.level:>3} {v.parent or '-':<16} {v.currency:<4} "
                   f"{v.account_id or '-':<24} {_money(v.balance_micros) or '-':>16} {v.accounts:>6}")


@tenants.command()
@click.argument("name")
@click.option("--tree", is_flag=True, help="The whole subtree, with each level's balance and currency.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, name: str, tree: bool, as_json: bool) -> None:
    """One tenant: its parent, level, currency, its own account's money, its accounts and plans."""
    with app(ctx).transaction() as session:
        view = repo.view_tenant(session, name, tree=tree)
    if as_json:
        print_json(tenant_json(view, tree=tree))
        return
    if not tree:
        click.echo(f"{'tenant':<10} {view.name} (level {view.level})")
        click.echo(f"{'parent':<10} {view.parent or '-'}")
        click.echo(f"{'currency':<10} {view.currency}")
        click.echo(f"{'pays with':<10} {_own(view)}")
        click.echo(f"{'accounts':<10} {view.accounts}")
        click.echo(f"{'plans':<10} {', '.join(view.plans) or '-'}")
        return
    _echo_tree(view, 0)


def _echo_tree(view: repo.TenantView, depth: int) -> None:
    click.echo(f"{'  ' * depth}{view.name} (level {view.level}, {view.currency}, {view.accounts} accounts): "
               f"{_own(view)}")
    for child in view.children:
        _echo_tree(child, depth + 1)
