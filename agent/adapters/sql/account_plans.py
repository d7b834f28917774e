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

import logging
from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from agent.adapters.sql.models import Account, RatePlan

log = logging.getLogger(__name__)


class PlanLookupUnavailable(Exception):
    """The database does not answer and the account's plan was never seen."""


class AccountPlans:
    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 3_000, retry_ms: int = 2_000) -> None:
        self.engine = engine
        self.now_ms = now_ms
        self.ttl_ms = ttl_ms
        self.negative_ttl_ms = negative_ttl_ms
        self.retry_ms = retry_ms
        self._cache: dict[str, tuple[str | None, int]] = {}
        self._retry_at_ms = 0  # the database failed: not asked again before this
        self.stale_since_ms: int | None = None  # serving last known plans since (the database is down)
        self.stale_served = 0

    def plan_of(self, account_id: str) -> str | None:
        now = self.now_ms()
        cached = self._cache.get(account_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        if now < self._retry_at_ms:
            return self._last_known(account_id, cached, "the database failed moments ago")
        try:
            with self.engine.connect() as conn:
                plan = conn.scalar(
                    select(RatePlan.name).join(Account, Account.rate_plan_id == RatePlan.id)
                    .where(Account.id == account_id))
        except SQLAlchemyError as exc:
            self._retry_at_ms = now + self.retry_ms
            if self.stale_since_ms is None:
                self.stale_since_ms = now
                log.error("database unreachable for account plans (%s); serving each account's last known plan, "
                          "refusing accounts never seen", exc.__class__.__name__)
            return self._last_known(account_id, cached, f"{exc.__class__.__name__}")
        if self.stale_since_ms is not None:
            log.warning("database answers again for account plans after %.1f s (%d calls rated on a last known "
                        "plan meanwhile)", (now - self.stale_since_ms) / 1000, self.stale_served)
            self.stale_since_ms = None
            self.stale_served = 0
        self._cache[account_id] = (plan, now + (self.ttl_ms if plan is not None else self.negative_ttl_ms))
        return plan

    def _last_known(self, account_id: str, cached: tuple[str | None, int] | None, why: str) -> str | None:
        if cached is None or cached[0] is None:
            raise PlanLookupUnavailable(f"the database does not answer ({why}) and the plan of account "
                                        f"{account_id!r} was never seen")
        self.stale_served += 1
        return cached[0]

    def forget(self, account_id: str | None = None) -> None:
        if account_id is None:
            self._cache.clear()
        else:
            self._cache.pop(account_id, None)
