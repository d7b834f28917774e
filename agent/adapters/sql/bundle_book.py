"""The bundle grants of each account, cached for the authorization hot path (DESIGN §9).

A call needs the account's grants in force (with their bundles' prefixes) to know which
bundle periods it may draw on. Like the account's plan (``account_plans.py``) they are read
from SQL at most every ``ttl_ms`` per account, so a new grant is usable within seconds and an
authorization normally does no SQL at all. The seconds themselves are counted by the balance
store, never here.

When the database does not answer, the last known grants keep serving; an account whose grants
were never read is refused (``store_unavailable``) rather than rated on money alone: charging
money for a call its bundle covers is a wrong bill.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, or_, select

from agent.adapters.sql.balance_store import datetime_to_ms, ms_to_datetime
from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import Bundle, BundleGrant, BundlePrefix
from agent.core.bundles import BundleDef, PeriodKind
from agent.core.bundles import BundleGrant as Grant
from agent.core.rating import OPEN_END_MS


class BundlesUnavailable(Exception):
    """The database does not answer and the account's grants were never read."""


def load_grants(engine: Engine, account_id: str, now_ms: int) -> tuple[Grant, ...]:
    """The account's grants not yet ended, of bundles not deleted, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(BundleGrant.id, BundleGrant.valid_from, BundleGrant.valid_until, BundleGrant.reference,
                   Bundle.id, Bundle.name, Bundle.seconds, Bundle.period, Bundle.anchor, Bundle.rollover)
            .join(Bundle, Bundle.id == BundleGrant.bundle_id)
            .where(BundleGrant.account_id == account_id, Bundle.deleted_at.is_(None),
                   or_(BundleGrant.valid_until.is_(None), BundleGrant.valid_until > ms_to_datetime(now_ms)))
            .order_by(BundleGrant.id)).all()
        bundle_ids = {row[4] for row in rows}
        prefixes: dict[int, list[str]] = {}
        if bundle_ids:
            for bundle_id, prefix in conn.execute(select(BundlePrefix.bundle_id, BundlePrefix.prefix)
                                                  .where(BundlePrefix.bundle_id.in_(bundle_ids))):
                prefixes.setdefault(bundle_id, []).append(prefix)
    grants = []
    for grant_id, valid_from, valid_until, reference, bundle_id, name, seconds, period, anchor, rollover in rows:
        bundle = BundleDef(name, int(seconds), tuple(sorted(prefixes.get(bundle_id, ()))), PeriodKind(period),
                           int(anchor), bool(rollover), bundle_id)
        grants.append(Grant(int(grant_id), account_id, bundle, datetime_to_ms(valid_from),
                            OPEN_END_MS if valid_until is None else datetime_to_ms(valid_until), reference))
    return tuple(grants)


class BundleBook:
    """Each account's grants (``grants_of``), cached (see ``cached_lookup.py``): ``background``
    re-reads stale entries off the authorization path."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 5_000,
                 retry_ms: int = 2_000, background: bool = False) -> None:
        self.engine = engine
        self.now_ms = now_ms
        self.lookup: CachedLookup[tuple[Grant, ...]] = CachedLookup(
            "bundle grants", self._load, now_ms, ttl_ms=ttl_ms, retry_ms=retry_ms, background=background,
            unavailable=lambda why: BundlesUnavailable(f"the database does not answer ({why})"))

    def _load(self, account_id: str) -> tuple[Grant, ...]:
        return load_grants(self.engine, account_id, self.now_ms())

    def grants_of(self, account_id: str) -> tuple[Grant, ...]:
        try:
            return self.lookup.get(account_id)
        except BundlesUnavailable as exc:
            raise BundlesUnavailable(f"{exc} and the bundle grants of account {account_id!r} were never read") from None

    @property
    def stale_since_ms(self) -> int | None:
        return self.lookup.stale_since_ms

    def forget(self, account_id: str | None = None) -> None:
        self.lookup.forget(account_id)

    def close(self) -> None:
        self.lookup.close()
