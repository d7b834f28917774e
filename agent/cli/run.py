"""``billing-agent run``: the daemon (see agent/daemon.py)."""

from __future__ import annotations

import sys

import click

from agent.cli.common import app, handle_errors
from agent.config import Config


@click.command("run")
@click.pass_context
@handle_errors
def run_command(ctx: click.Context) -> None:
    """Run the billing daemon: authorize, supervise and bill calls until SIGTERM/SIGINT.

    The configuration is validated before any port is bound; a bad key exits with its name and
    the reason. SIGHUP reloads the rate plans; a second SIGTERM exits at once (open reservations
    then expire by themselves)."""
    context = app(ctx)
    config = context.config  # validation errors surface here, before anything listens
    from agent.config import load_config
    from agent.daemon import run_daemon

    def reload_config() -> Config:
        return load_config(context.config_path, overrides=context.overrides)

    sys.exit(run_daemon(config, reload_config))
