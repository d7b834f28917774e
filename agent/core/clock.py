"""Time helpers for the pure core: conversions only, never a clock read."""

from __future__ import annotations

from datetime import UTC, datetime


def ensure_utc(moment: datetime) -> datetime:
    """Return ``moment`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_iso8601(text: str, *, what: str = "time") -> datetime:
    """Parse an ISO 8601 timestamp (``2026-01-31T12:00:00Z``, with or without offset; naive = UTC)."""
    cleaned = text.strip()
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO 8601 date or timestamp") from None
    return ensure_utc(moment)
