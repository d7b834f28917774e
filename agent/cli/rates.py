"""``billing-agent rates`` and ``billing-agent plans``."""

from __future__ import annotations

import click


@click.group()
def rates() -> None:
    """Rate decks: import, quote."""
