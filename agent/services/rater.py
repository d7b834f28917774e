"""Rates a call: the account's plan, then the plan's in-memory table (agent/core/ratetable.py),
then, when the plan is priced in another currency than the account's, the FX conversion in
force at the call's start (DESIGN §11, agent/core/fx.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from agent.core.bundles import BundleGrant, slots_for
from agent.core.errors import BillingError
from agent.core.events import DenyReason
from agent.core.fx import Conversion, ConvertedTariff
from agent.core.ratetable import Refusal, format_instant
from agent.core.rating import RateRow
from agent.core.session import LevelRated, RatedCall, RatingInfo, RatingRefused, Tariff


class _Table(Protocol):
    timezone: str

    def lookup(self, number: str, at_ms: int) -> RateRow | Refusal: ...

    def normalise(self, number: str) -> str: ...


class _Tables(Protocol):
    def table_for(self, plan_name: str) -> _Table: ...


class _AccountPlan(Protocol):
    """The account's plan and currencies (agent/adapters/sql/account_plans.py ``AccountPlan``)."""

    @property
    def plan(self) -> str: ...

    @property
    def plan_currency(self) -> str: ...

    @property
    def currency(self) -> str: ...


_T = TypeVar("_T")
SHARED_MAX = 65_536  # PlanRater: rows and rating infos kept to be handed out again

# (plan currency, account currency, instant) -> the conversion in force, None when no rate
FxOf = Callable[[str, str, int], Conversion | None]


class _ChainLevel(Protocol):
    """One level above a customer (agent/adapters/sql/tenants.py ``ChainLevel``)."""

    @property
    def tenant(self) -> str: ...

    @property
    def parent(self) -> str: ...

    @property
    def account_id(self) -> str: ...


class PlanRater:
    """Implements the ``Rater`` port.

    ``plan_of`` gives the account's plan name, or its plan with both currencies: then a plan in
    another currency than the account's is converted at the rate ``fx_of`` finds in force at the
    call's start (no rate, or no ``fx_of``: refused with ``no_fx_rate``)."""

    def __init__(self, plan_of: Callable[[str], str | _AccountPlan | None], tables: _Tables,
                 grants_of: Callable[[str], Sequence[BundleGrant]] | None = None, *,
                 fx_of: FxOf | None = None, chain_of: Callable[[str], Sequence[_ChainLevel]] | None = None) -> None:
        self.plan_of = plan_of
        self.tables = tables
        self.grants_of = grants_of  # the account's bundle grants (DESIGN §9); None: no bundles
        self.fx_of = fx_of
        self.chain_of = chain_of  # the levels above an account (DESIGN §11); None: no derived charging
        # Rows and infos equal to one handed out before are handed out again (see _shared).
        self._shared: dict[object, object] = {}

    def read_ahead(self, account_id: str, at_ms: int) -> None:
        """Read now what rating a call of ``account_id`` reads through the look-ups, whatever
        its destination: the plan of the account and of every level above it, their bundle
        grants, and the FX pair of each plan priced in another currency than its account's (a
        starting node's warm-up, agent/adapters/sql/warm_up.py). A look-up's error is raised."""
        levels = self.chain_of(account_id) if self.chain_of is not None else ()
        for owner in (account_id, *(level.account_id for level in levels)):
            found = self.plan_of(owner)
            if found is None:
                continue
            if self.grants_of is not None:
                self.grants_of(owner)
            if not isinstance(found, str) and found.plan_currency != found.currency and self.fx_of is not None:
                self.fx_of(found.plan_currency, found.currency, at_ms)

    def rate_chain(self, account_id: str, destination: str, at_ms: int) -> tuple[LevelRated, ...]:
        """Each level above ``account_id``, nearest first, rated by its own account's plan (the
        seller's, FX applied into the reseller's currency); () for a direct customer. A level
        with no rate refuses the call with that level's reason, naming the tenant."""
        if self.chain_of is None:
            return ()
        try:
            levels = self.chain_of(account_id)
        except Exception as exc:  # never read and the database is down: charging one level only would be wrong
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"tenants above account {account_id!r} unknown: {exc.__class__.__name__}: {exc}"
                                ) from exc
        if not levels:
            return ()
        rated: list[LevelRated] = []
        for number, level in enumerate(levels, start=1):
            try:
                found = self.rate(level.account_id, destination, at_ms)
            except RatingRefused as refused:
                raise RatingRefused(refused.reason, f"tenant {level.tenant!r} (account {level.account_id!r}, "
                                                    f"buying from {level.parent!r}): {refused.detail}") from None
            rated.append(LevelRated(number, level.tenant, level.parent, level.account_id,
                                    RatedCall(found.tariff, found.info)))
        return tuple(rated)

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        try:
            found = self.plan_of(account_id)
        except Exception as exc:  # the database is down and the account is not cached: deny, never hang
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"plan of account {account_id!r} unknown: {exc.__class__.__name__}: {exc}") from exc
        if found is None:
            raise RatingRefused(DenyReason.UNKNOWN_ACCOUNT, f"unknown account {account_id!r}")
        plan = found if isinstance(found, str) else found.plan
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
        result = self._share(result)
        # RatingInfo built once, not through dataclasses.replace: a reseller's customer rates
        # every level above it on each authorization (bench_tenants.py).
        tariff: Tariff = result
        if isinstance(found, str):
            info = RatingInfo(plan, result.rate_id, result.prefix, result.rate_micros)
        elif found.plan_currency == found.currency:
            info = RatingInfo(plan, result.rate_id, result.prefix, result.rate_micros, found.plan_currency,
                              found.currency)
        else:
            conversion = self._conversion(account_id, plan, found, at_ms)
            tariff = ConvertedTariff(result, conversion)
            info = RatingInfo(plan, result.rate_id, result.prefix, result.rate_micros, found.plan_currency,
                              found.currency, conversion.rate_e10, conversion.inverse)
        info = self._share(info)
        if self.grants_of is None:
            return RatedCall(tariff, info)
        try:
            grants = self.grants_of(account_id)
        except Exception as exc:  # never read and the database is down: a money-only bill would be wrong
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"bundles of account {account_id!r} unknown: {exc.__class__.__name__}: {exc}") from exc
        if not grants:
            return RatedCall(tariff, info)
        # The periods read in the plan's timezone, the number as the plan rates it (DESIGN §9).
        slots = slots_for(grants, table.normalise(destination), at_ms, table.timezone)
        return RatedCall(tariff, info, slots)

    def _share(self, value: _T) -> _T:
        """The one object equal to ``value`` this rater handed out, else ``value`` (kept).

        A live call keeps its row and its rating info (one pair per level of a reseller chain)
        until it ends, and every object a call keeps makes the garbage collector's young
        collections come sooner (bench_tenants.py fastagi: a customer three levels deep kept 17
        tracked objects per call against 7 for a direct one). The table makes a new row per
        look-up (cheaper than a cache there); equal ones are shared here, so live calls to the
        same destination keep nothing of their own for it. Bounded: forgotten at 65,536."""
        found = self._shared.get(value)
        if found is not None:
            return found  # type: ignore[return-value]
        if len(self._shared) >= SHARED_MAX:
            self._shared.clear()
        self._shared[value] = value
        return value

    def _conversion(self, account_id: str, plan: str, found: _AccountPlan, at_ms: int) -> Conversion:
        pair = f"{found.plan_currency}->{found.currency}"
        if self.fx_of is None:
            raise RatingRefused(DenyReason.NO_FX_RATE, f"plan {plan!r} is priced in {found.plan_currency}, account "
                                                       f"{account_id!r} pays in {found.currency}: no FX rates here")
        try:
            conversion = self.fx_of(found.plan_currency, found.currency, at_ms)
        except Exception as exc:  # never read and the database is down: deny, never guess a rate
            raise RatingRefused(DenyReason.STORE_UNAVAILABLE,
                                f"FX rate {pair} unknown: {exc.__class__.__name__}: {exc}") from exc
        if conversion is None:
            raise RatingRefused(DenyReason.NO_FX_RATE,
                                f"no FX rate {pair} (nor {found.currency}/{found.plan_currency}) in force at "
                                f"{format_instant(at_ms)}: plan {plan!r} is priced in {found.plan_currency}, "
                                f"account {account_id!r} pays in {found.currency}")
        return conversion
