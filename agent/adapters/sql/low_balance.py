"""Low-balance alert thresholds (DESIGN §8): ``accounts.low_balance_micros`` or, when that is NULL,
``rate_plans.low_balance_micros`` of the account's plan; NULL on both: no alert for the account.

:class:`LowBalanceThresholds` caches the threshold in force per account for the daemon, with the
rules of ``cached_lookup.py`` (as account plans): ``ttl_ms`` for a known account,
``negative_ttl_ms`` for an unknown one; while the database does not answer, the last known
threshold serves and the database is not asked again for ``retry_ms``. A change made with the CLI
applies within ``ttl_ms`` (30 s).
The functions below are the CLI's (``accounts set-low-balance``, ``plans set-low-balance``,
``accounts show``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import Account, RatePlan, utcnow
from agent.core.errors import InvalidInput, NotFound

MAX_THRESHOLD_MICROS = 10**15  # 1e9 units: a typo guard, far above any real threshold


class ThresholdUnavailable(Exception):
    """The database does not answer and the account's threshold was never read."""


class LowBalanceThresholds:
    """The threshold in force per account (``threshold_of``), cached by ``CachedLookup`` (the
    rules of ``cached_lookup.py``, as for account plans). Read from the low-balance watch's own
    greenlet, never from the call path."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 10_000, retry_ms: int = 5_000) -> None:
        self.engine = engine
        self.reads = 0
        self.lookup: CachedLookup[tuple[bool, int | None]] = CachedLookup(
            "low-balance thresholds", self._load, now_ms, ttl_ms=ttl_ms, negative_ttl_ms=negative_ttl_ms,
            retry_ms=retry_ms, found=lambda value: value[0],
            unavailable=lambda why: ThresholdUnavailable(f"the database does not answer ({why})"))

    def _load(self, account_id: str) -> tuple[bool, int | None]:
        """(the account exists, its threshold in force)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(Account.low_balance_micros, RatePlan.low_balance_micros)
                               .join(RatePlan, Account.rate_plan_id == RatePlan.id)
                               .where(Account.id == account_id)).first()
        self.reads += 1
        if row is None:
            return False, None
        return True, row[0] if row[0] is not None else row[1]

    def threshold_of(self, account_id: str) -> int | None:
        """The threshold in force (micro-units), None when the account has none (or is unknown);
        raises ThresholdUnavailable when the database is away and the account was never read."""
        try:
            return self.lookup.get(account_id)[1]
        except ThresholdUnavailable as exc:
            raise ThresholdUnavailable(f"{exc} and the low-balance threshold of account {account_id!r} was never "
                                       "read") from None

    def forget(self, account_id: str | None = None) -> None:
        self.lookup.forget(account_id)


@dataclass(frozen=True)
class ThresholdView:
    account_id: str
    plan: str
    account_micros: int | None  # the account's own (NULL: the plan's applies)
    plan_micros: int | None

    @property
    def in_force_micros(self) -> int | None:
        return self.account_micros if self.account_micros is not None else self.plan_micros

    @property
    def source(self) -> str | None:
        """``account``, ``plan`` or None (no alert)."""
        if self.account_micros is not None:
            return "account"
        return "plan" if self.plan_micros is not None else None


def _check(micros: int | None) -> None:
    if micros is not None and not 0 <= micros <= MAX_THRESHOLD_MICROS:
        raise InvalidInput(f"low-balance threshold {micros} micro-units must be between 0 and "
                           f"{MAX_THRESHOLD_MICROS}")


def threshold_view(session: Session, account_id: str) -> ThresholdView:
    row = session.execute(select(Account.low_balance_micros, RatePlan.name, RatePlan.low_balance_micros)
                          .join(RatePlan, Account.rate_plan_id == RatePlan.id)
                          .where(Account.id == account_id)).first()
    if row is None:
        raise NotFound(f"unknown account {account_id!r}")
    return ThresholdView(account_id, row[1], row[0], row[2])


def set_account_threshold(session: Session, account_id: str, micros: int | None) -> ThresholdView:
    """Set (None: clear, the plan's applies) the account's own threshold."""
    _check(micros)
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"unknown account {account_id!r}")
    account.low_balance_micros = micros
    account.updated_at = utcnow()
    session.flush()
    return threshold_view(session, account_id)


def set_plan_threshold(session: Session, plan_name: str, micros: int | None) -> tuple[str, int | None, int]:
    """Set (None: clear) the plan's threshold; returns (plan, threshold, accounts of the plan that
    have none of their own, to which it applies)."""
    _check(micros)
    plan = session.scalar(select(RatePlan).where(RatePlan.name == plan_name))
    if plan is None:
        raise NotFound(f"unknown plan {plan_name!r}")
    plan.low_balance_micros = micros
    plan.updated_at = utcnow()
    session.flush()
    inheriting = session.scalar(select(func.count()).select_from(Account).where(
        Account.rate_plan_id == plan.id, Account.low_balance_micros.is_(None)))
    return plan.name, micros, int(inheriting or 0)
