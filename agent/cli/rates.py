"""``billing-agent rates``: import decks, quote calls."""

from __future__ import annotations

import click

from agent.cli.rates_import import import_command
from agent.cli.rates_quote import quote_command


@click.group()
def rates() -> None:
    """Rate decks: import, quote."""


rates.add_command(import_command)
rates.add_command(quote_command)
