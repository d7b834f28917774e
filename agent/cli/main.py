"""Entry point of ``billing-agent``."""

from __future__ import annotations

from typing import Any

import click

from agent import __version__
from agent.cli.accounts import accounts
from agent.cli.bundles import bundles
from agent.cli.calls import calls
from agent.cli.carriers import carriers
from agent.cli.cdrs import cdrs
from agent.cli.common import AppContext
from agent.cli.db import db
from agent.cli.demo import demo_command
from agent.cli.fraud import alerts, fraud
from agent.cli.fx import fx
from agent.cli.ledger import ledger
from agent.cli.limits import limits
from agent.cli.plans import plans
from agent.cli.rates import rates
from agent.cli.rerate import rerate_command
from agent.cli.run import run_command
from agent.cli.tenants import tenants


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="BILLING_AGENT_CONFIG",
              help="YAML config file (default: agent.yaml in the current folder when present, "
                   "else the embedded default: SQLite billing-agent.db, no Redis).")
@click.option("--database-url", help="Override database.url (an SQLAlchemy URL).")
@click.version_option(__version__, prog_name="billing-agent")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, database_url: str | None) -> None:
    """Real-time billing agent for Asterisk and FreeSWITCH."""
    overrides: dict[str, dict[str, Any]] = {}
    if database_url:
        overrides["database"] = {"url": database_url}
    context = AppContext(config_path=config_path, overrides=overrides)
    ctx.obj = context
    ctx.call_on_close(context.close)


cli.add_command(db)
cli.add_command(accounts)
cli.add_command(limits)
cli.add_command(bundles)
cli.add_command(plans)
cli.add_command(rates)
cli.add_command(ledger)
cli.add_command(cdrs)
cli.add_command(rerate_command)
cli.add_command(calls)
cli.add_command(run_command)
cli.add_command(demo_command)
cli.add_command(fraud)
cli.add_command(alerts)
cli.add_command(fx)
cli.add_command(tenants)
cli.add_command(carriers)


def main() -> None:
    cli(prog_name="billing-agent")
