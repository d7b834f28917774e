"""``billing-agent ledger``: prove from SQL alone that the money adds up."""

from __future__ import annotations

import click
from sqlalchemy import select

from agent.adapters.sql.accounts import ledger_sums
from agent.adapters.sql.models import Account
from agent.cli.common import app, fail, handle_errors, print_json
from agent.core.money import format_amount


@click.group()
def ledger() -> None:
    """The append-only ledger."""


@ledger.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def check(ctx: click.Context, as_json: bool) -> None:
    """Check that every account's balance equals the sum of its ledger (exit 1 on any difference)."""
    with app(ctx).transaction() as session:
        sums = ledger_sums(session)
        balances = {a: b for a, b in session.execute(select(Account.id, Account.balance_micros))}
    problems: list[dict[str, str | None]] = []
    for account_id, balance in sorted(balances.items()):
        total = sums.get(account_id, 0)
        if total != balance:
            problems.append({"account": account_id, "problem": "balance differs from ledger sum",
                             "balance": format_amount(balance), "ledger_sum": format_amount(total)})
    for account_id in sorted(set(sums) - set(balances)):
        problems.append({"account": account_id, "problem": "ledger entries for an unknown account",
                         "balance": None, "ledger_sum": format_amount(sums[account_id])})
    if as_json:
        print_json({"accounts": len(balances), "ok": not problems, "problems": problems})
    else:
        for p in problems:
            click.echo(f"{p['account']}: {p['problem']} (balance {p['balance']}, ledger {p['ledger_sum']})")
        if not problems:
            click.echo(f"ledger ok: {len(balances)} accounts, every balance equals the sum of its ledger")
    if problems:
        fail(f"{len(problems)} difference(s) found", code=1)
