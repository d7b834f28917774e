"""Rates a call: the account's plan, then the plan's in-memory table (agent/core/ratetable.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agent.core.errors import BillingError
from agent.core.events import DenyReason
from agent.core.ratetable import Refusal
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo, RatingRefused


class _Table(Protocol):
    def lookup(self, number: str, at_ms: int) -> RateRow | Refusal: ...


class _Tables(Protocol):
    def table_for(self, plan_name: str) -> _Table: ...


class PlanRater:
    """Implements the ``Rater`` port."""

    def __init__(self, plan_of: Callable[[str], str | None], tables: _Tables) -> None:
        self.plan_of = plan_of
        self.tables = tables

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        try:
            plan = self.plan_of(account_id)
        except Exception as exc:  # the database is down and the account is not cached: deny, never hang
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"plan of account {account_id!r} unknown: {exc.__class__.__name__}: {exc}") from exc
        if plan is None:
            raise RatingRefused(DenyReason.UNKNOWN_ACCOUNT, f"unknown account {account_id!r}")
        try:
            table = self.tables.table_for(plan)
        except BillingError as exc:  # an unknown plan, unusable rows
            raise RatingRefused(DenyReason.NO_RATE, f"plan {plan!r} cannot be loaded: {exc}") from None
        except Exception as exc:  # the database is down during a first load: deny now, retry next call
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"plan {plan!r} cannot be loaded: {exc.__class__.__name__}: {exc}") from exc
        result = table.lookup(destination, at_ms)
        if isinstance(result, Refusal):
            raise RatingRefused(result.reason, result.detail)
        return RatedCall(result, RatingInfo(plan, result.rate_id, result.prefix, result.rate_micros))
