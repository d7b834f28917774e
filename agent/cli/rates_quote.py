"""``billing-agent rates quote`` (being written: see issue 3)."""

from __future__ import annotations

import click


@click.command(name="quote")
def quote_command() -> None:
    """Quote a call (not implemented yet)."""
    raise click.ClickException("rates quote is not implemented yet")
