"""Low-balance alert thresholds (DESIGN §8): ``accounts set-low-balance ID AMOUNT|none`` and
``plans set-low-balance NAME AMOUNT|none``; ``accounts show`` prints the threshold in force.

An account's own threshold wins; ``none`` clears it and its plan's applies; a plan's ``none``
leaves its accounts without one of their own unwatched. ``0`` alerts only when the money runs
out (balance exhausted). Running daemons read a change within 30 s.
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.orm import Session

from agent.adapters.sql import low_balance as repo
from agent.cli.common import app, handle_errors, print_json
from agent.core.money import MoneyError, format_amount, parse_amount


class ThresholdType(click.ParamType):  # type: ignore[type-arg]
    """An amount (0 or more), or ``none``."""

    name = "amount|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if isinstance(value, int) or value is None:
            return value
        if str(value).strip().lower() in ("none", "off"):
            return None
        try:
            amount = parse_amount(str(value))
        except MoneyError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)
        if amount < 0:
            self.fail(f"{value!r}: a threshold must not be negative", param, ctx)
        return amount


THRESHOLD = ThresholdType()


def threshold_json(view: repo.ThresholdView) -> dict[str, Any]:
    def amount(micros: int | None) -> str | None:
        return None if micros is None else format_amount(micros)

    return {"low_balance": amount(view.in_force_micros), "low_balance_source": view.source,
            "low_balance_account": amount(view.account_micros), "low_balance_plan": amount(view.plan_micros)}


def describe(view: repo.ThresholdView) -> str:
    """The threshold in force, for people: ``5.000000 (the account's own)``."""
    if view.account_micros is not None:
        return f"{format_amount(view.account_micros)} (the account's own)"
    if view.plan_micros is not None:
        return f"{format_amount(view.plan_micros)} (plan {view.plan})"
    return "none"


def account_threshold(session: Session, account_id: str) -> repo.ThresholdView:
    return repo.threshold_view(session, account_id)


@click.command("set-low-balance")
@click.argument("account_id")
@click.argument("amount", type=THRESHOLD)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def set_account_low_balance(ctx: click.Context, account_id: str, amount: int | None, as_json: bool) -> None:
    """Alert when ACCOUNT_ID's available money falls below AMOUNT ('none': its plan's threshold
    applies; 0: only when the money runs out)."""
    with app(ctx).transaction() as session:
        view = repo.set_account_threshold(session, account_id, amount)
    if as_json:
        print_json({"account": account_id, **threshold_json(view)})
    else:
        click.echo(f"account {account_id}: low-balance alert below {describe(view)}")


@click.command("set-low-balance")
@click.argument("name")
@click.argument("amount", type=THRESHOLD)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def set_plan_low_balance(ctx: click.Context, name: str, amount: int | None, as_json: bool) -> None:
    """Alert when the available money of plan NAME's accounts falls below AMOUNT, for those
    without a threshold of their own ('none': no alert for them)."""
    with app(ctx).transaction() as session:
        plan, micros, inheriting = repo.set_plan_threshold(session, name, amount)
    shown = None if micros is None else format_amount(micros)
    if as_json:
        print_json({"plan": plan, "low_balance": shown, "accounts_using_it": inheriting})
    else:
        click.echo(f"plan {plan}: low-balance alert below {shown or 'none'} for its {inheriting} accounts "
                   "without a threshold of their own")
