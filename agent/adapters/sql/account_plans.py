"""Which rate plan an account is rated on, cached for the authorization hot path.

Plans change rarely; an authorization must not wait on SQL. Known accounts are cached for
``ttl_ms`` and unknown ones for a shorter time, so a new account becomes usable quickly.

When the database does not answer, the last known plan of an account keeps serving (a plan
change is the rare case; refusing every call of a node because the database blinked is the
costly one), the database is not asked again for ``retry_ms`` (each try would hold a call for
the connect timeout), and ``stale_since_ms`` says since when, for the log and ``/health``. An
account never seen before is refused (``store_unavailable``) until the database answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy import Engine, select

from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import Account, RatePlan


class PlanLookupUnavailable(Exception):
    """The database does not answer and the account's plan was never seen."""


class AccountPlan(NamedTuple):
    """What rating needs to know about an account: its plan, the plan's currency and its own."""

    plan: str
    plan_currency: str
    currency: str


class AccountPlans:
    """The plan of each account (``plan_of``; None for an unknown account) and the currencies
    (``rating_of``), one cached read (see ``cached_lookup.py``): ``background`` re-reads stale
    entries off the authorization path."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 3_000, retry_ms: int = 2_000, background: bool = False) -> None:
        self.engine = engine
        self.lookup: CachedLookup[AccountPlan | None] = CachedLookup(
            "account plans", self._load, now_ms, ttl_ms=ttl_ms, negative_ttl_ms=negative_ttl_ms, retry_ms=retry_ms,
            background=background, found=lambda plan: plan is not None,
            unavailable=lambda why: PlanLookupUnavailable(f"the database does not answer ({why})"))

    def _load(self, account_id: str) -> AccountPlan | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(RatePlan.name, RatePlan.currency, Account.currency)
                               .join(Account, Account.rate_plan_id == RatePlan.id)
                               .where(Account.id == account_id)).first()
        return None if row is None else AccountPlan(row[0], row[1], row[2])

    def rating_of(self, account_id: str) -> AccountPlan | None:
        """The account's plan and currencies (None: unknown account)."""
        try:
            return self.lookup.get(account_id)
        except PlanLookupUnavailable as exc:
            raise PlanLookupUnavailable(f"{exc} and the plan of account {account_id!r} was never seen") from None

    def plan_of(self, account_id: str) -> str | None:
        found = self.rating_of(account_id)
        return None if found is None else found.plan

    @property
    def stale_since_ms(self) -> int | None:
        return self.lookup.stale_since_ms

    @property
    def stale_served(self) -> int:
        return self.lookup.stale_served

    def forget(self, account_id: str | None = None) -> None:
        self.lookup.forget(account_id)

    def close(self) -> None:
        self.lookup.close()
