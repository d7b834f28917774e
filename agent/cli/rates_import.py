"""``billing-agent rates import`` (being written: see issue 2)."""

from __future__ import annotations

import click


@click.command(name="import")
def import_command() -> None:
    """Import a rate deck (not implemented yet)."""
    raise click.ClickException("rates import is not implemented yet")
