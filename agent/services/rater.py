"""Rates a call: the account's plan, then the plan's in-memory table (agent/core/ratetable.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from agent.core.bundles import BundleGrant, slots_for
from agent.core.errors import BillingError
from agent.core.events import DenyReason
from agent.core.ratetable import Refusal
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo, RatingRefused


class _Table(Protocol):
    timezone: str

    def lookup(self, number: str, at_ms: int) -> RateRow | Refusal: ...

    def normalise(self, number: str) -> str: ...


class _Tables(Protocol):
    def table_for(self, plan_name: str) -> _Table: ...


class PlanRater:
    """Implements the ``Rater`` port."""

    def __init__(self, plan_of: Callable[[str], str | None], tables: _Tables,
                 grants_of: Callable[[str], Sequence[BundleGrant]] | None = None) -> None:
        self.plan_of = plan_of
        self.tables = tables
        self.grants_of = grants_of  # the account's bundle grants (DESIGN §9); None: no bundles

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
        info = RatingInfo(plan, result.rate_id, result.prefix, result.rate_micros)
        if self.grants_of is None:
            return RatedCall(result, info)
        try:
            grants = self.grants_of(account_id)
        except Exception as exc:  # never read and the database is down: a money-only bill would be wrong
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"bundles of account {account_id!r} unknown: {exc.__class__.__name__}: {exc}") from exc
        if not grants:
            return RatedCall(result, info)
        # The periods read in the plan's timezone, the number as the plan rates it (DESIGN §9).
        slots = slots_for(grants, table.normalise(destination), at_ms, table.timezone)
        return RatedCall(result, info, slots)
