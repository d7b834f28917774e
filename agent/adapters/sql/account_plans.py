"""Which rate plan an account is rated on, cached for the authorization hot path.

Plans change rarely; an authorization must not wait on SQL. Known accounts are cached for
``ttl_ms`` and unknown ones for a shorter time, so a new account becomes usable quickly.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select

from agent.adapters.sql.models import Account, RatePlan


class AccountPlans:
    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 3_000) -> None:
        self.engine = engine
        self.now_ms = now_ms
        self.ttl_ms = ttl_ms
        self.negative_ttl_ms = negative_ttl_ms
        self._cache: dict[str, tuple[str | None, int]] = {}

    def plan_of(self, account_id: str) -> str | None:
        now = self.now_ms()
        cached = self._cache.get(account_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self.engine.connect() as conn:
            plan = conn.scalar(
                select(RatePlan.name).join(Account, Account.rate_plan_id == RatePlan.id).where(Account.id == account_id)
            )
        self._cache[account_id] = (plan, now + (self.ttl_ms if plan is not None else self.negative_ttl_ms))
        return plan

    def forget(self, account_id: str | None = None) -> None:
        if account_id is None:
            self._cache.clear()
        else:
            self._cache.pop(account_id, None)
