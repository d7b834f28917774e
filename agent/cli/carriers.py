"""``billing-agent carriers``: the carriers (trunks) calls are terminated on and their buy decks
(DESIGN §10): create, list, show, disable, enable. Buy decks: ``rates import FILE --carrier NAME``."""

from __future__ import annotations

import dataclasses

import click

from agent.adapters.sql import carriers as repo
from agent.cli.common import app, handle_errors, print_json


def _line(view: repo.CarrierView) -> str:
    limit = "no limit" if view.max_channels is None else f"{view.max_channels} channels"
    deck = (f"{view.buy_rates} buy rates (version {view.buy_version})" if view.buy_version is not None
            else "no buy deck yet")
    state = "enabled" if view.enabled else "DISABLED"
    return (f"{view.name}: trunk {view.trunk}, {state}, {limit}, priority {view.priority}, weight {view.weight}, "
            f"{view.currency}, {deck}")


@click.group()
def carriers() -> None:
    """Carriers (trunks) with their channel limit, priority, weight and buy deck."""


@carriers.command()
@click.argument("name")
@click.option("--trunk", required=True, help="Asterisk trunk (PJSIP/name, SIP/name) or FreeSWITCH gateway.")
@click.option("--max-channels", type=int, help="Most calls at once on this carrier, cluster-wide (default: no limit).")
@click.option("--priority", type=int, default=0, show_default=True, help="Lower is tried first.")
@click.option("--weight", type=int, default=1, show_default=True,
              help="Share of first attempts within a priority (route policy weight).")
@click.option("--currency", help="The currency of its buy deck (default: billing.default_currency).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def create(ctx: click.Context, name: str, trunk: str, max_channels: int | None, priority: int, weight: int,
           currency: str | None, as_json: bool) -> None:
    """Create the carrier NAME."""
    context = app(ctx)
    with context.transaction() as session:
        view = repo.create_carrier(session, name, trunk=trunk, max_channels=max_channels, priority=priority,
                                   weight=weight, currency=currency or context.config.billing.default_currency)
    if as_json:
        print_json(dataclasses.asdict(view))
    else:
        click.echo(f"created carrier {_line(view)}")


@carriers.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List the carriers, by priority."""
    with app(ctx).transaction() as session:
        views = repo.list_carriers(session)
    if as_json:
        print_json([dataclasses.asdict(v) for v in views])
        return
    click.echo(f"{'NAME':<16} {'TRUNK':<24} {'STATE':<8} {'CHANNELS':>8} {'PRIO':>4} {'WEIGHT':>6} {'CUR':<4} "
               f"{'BUY RATES':>9}")
    for v in views:
        click.echo(f"{v.name:<16} {v.trunk:<24} {'on' if v.enabled else 'off':<8} "
                   f"{'-' if v.max_channels is None else v.max_channels:>8} {v.priority:>4} {v.weight:>6} "
                   f"{v.currency:<4} {v.buy_rates:>9}")


@carriers.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show the carrier NAME."""
    with app(ctx).transaction() as session:
        view = repo.show_carrier(session, name)
    if as_json:
        print_json(dataclasses.asdict(view))
    else:
        click.echo(_line(view))


def _state_command(enabled: bool) -> click.Command:
    verb = "enable" if enabled else "disable"

    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    @handle_errors
    def command(ctx: click.Context, name: str, as_json: bool) -> None:
        with app(ctx).transaction() as session:
            view = repo.set_enabled(session, name, enabled)
        if as_json:
            print_json(dataclasses.asdict(view))
        else:
            click.echo(f"{verb}d carrier {_line(view)}")

    command.__doc__ = ("Enable the carrier NAME: new calls may use it again." if enabled else
                       "Disable the carrier NAME: new calls avoid it; its live calls go on.")
    return click.command(name=verb)(command)


carriers.add_command(_state_command(False))
carriers.add_command(_state_command(True))
