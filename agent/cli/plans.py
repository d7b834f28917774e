"""``billing-agent plans``: create and list rate plans; their low-balance alert threshold."""

from __future__ import annotations

import dataclasses

import click

from agent.adapters.sql import plans as repo
from agent.adapters.sql.tenants import subtree_ids
from agent.cli.common import app, handle_errors, print_json
from agent.cli.low_balance import set_plan_low_balance


@click.group()
def plans() -> None:
    """Rate plans (price lists); import their rates with `rates import`."""


@plans.command()
@click.argument("name")
@click.option("--currency", default="EUR", show_default=True)
@click.option("--timezone", default="UTC", show_default=True,
              help="IANA zone in which time-of-day rate windows are read.")
@click.option("--international-prefix", default="00", show_default=True,
              help="Dialled prefix stripped before rating (as a leading '+' is).")
@click.option("--tenant", help="The tenant that sells on it (default: the operator's root, `default`).")
@click.pass_context
@handle_errors
def create(ctx: click.Context, name: str, currency: str, timezone: str, international_prefix: str,
           tenant: str | None) -> None:
    """Create the rate plan NAME."""
    with app(ctx).transaction() as session:
        plan = repo.create_plan(session, name, currency=currency, timezone=timezone,
                                international_prefix=international_prefix, tenant=tenant)
    click.echo(f"created plan {plan.name} ({plan.currency}, {plan.timezone}) of tenant {plan.tenant}")


@plans.command(name="list")
@click.option("--tenant", help="Only the plans of this tenant and the tenants below it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """List rate plans with their number of rates."""
    with app(ctx).transaction() as session:
        views = repo.list_plans(session, tenant_ids=subtree_ids(session, tenant) if tenant else None)
    if as_json:
        print_json([dataclasses.asdict(v) for v in views])
        return
    click.echo(f"{'NAME':<20} {'CUR':<4} {'TIMEZONE':<20} {'RATES':>9} {'VERSION':>7}  TENANT")
    for v in views:
        click.echo(f"{v.name:<20} {v.currency:<4} {v.timezone:<20} {v.rate_count:>9} {v.version:>7}  {v.tenant}")


plans.add_command(set_plan_low_balance)


@plans.command(name="set-route-policy")
@click.argument("name")
@click.argument("policy")
@click.option("--allow-loss", is_flag=True,
              help="Route to carriers that cost more than the sell price (default: never; revenue assurance).")
@click.option("--margin-floor", help="Alert below this margin: money per minute (0.002), a percentage of the "
                                     "sell cost (5%), or none. Unchanged when left out.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def set_route_policy(ctx: click.Context, name: str, policy: str, allow_loss: bool, margin_floor: str | None,
                     as_json: bool) -> None:
    """How the carriers of plan NAME's calls are ordered: POLICY is lcr, priority or weight."""
    from agent.adapters.sql.carriers import set_route_policy as set_policy

    with app(ctx).transaction() as session:
        view = set_policy(session, name, policy, allow_loss=allow_loss, margin_floor=margin_floor)
    if as_json:
        print_json(dataclasses.asdict(view))
    else:
        loss = "losses allowed" if view.allow_loss else "no loss (revenue assurance)"
        click.echo(f"plan {view.plan}: route policy {view.route_policy}, {loss}, margin floor {view.margin_floor}")
