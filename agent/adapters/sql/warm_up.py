"""A starting node's first calls without the start's one-time costs.

The first authorization after a start paid for everything done once per process: SQLAlchemy
compiles each statement the first time it runs (the plan, bundle, tenant-chain and FX look-ups,
the balance store's statements), and each look-up cache is empty. Measured in process on the
embedded SQLite store with the daemon's objects (the demo's database): the first authorization
took 10-15 ms against 0.4-0.5 for the next ones, a reseller's first customer 5-8 ms; with this
warm-up 0.95 and 1.2 ms. Every account never seen still pays its three reads (1.5-2 ms) unless
it is sampled here. On a real FreeSWITCH the first call was one of the two slowest of a run.

:func:`warm_up` runs before the PBX adapters accept calls: it reads the look-ups of the accounts
most likely to call first (those with calls open now, which a restart adopts and whose callers
call again; one customer of a reseller for the chain's statements; any account with money) into
the caches, and has the SQL balance store compile a whole plain call in a transaction it rolls
back (:meth:`SqlBalanceStore.warm_up`). It never writes, never fails the start (a failure is a
log line: the first calls then pay as before) and stops at its time budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.models import Account, Reservation, Tenant

log = logging.getLogger(__name__)

LIVE_ACCOUNTS_LIMIT = 500  # accounts with calls open read at most (each is 3-4 reads)


@dataclass(frozen=True)
class WarmUpSample:
    accounts: tuple[str, ...]  # the look-ups to read, most likely first
    funded: str | None  # an active account with money: the store's made-up call


@dataclass(frozen=True)
class WarmUpReport:
    accounts: int  # accounts whose look-ups were read into the caches
    of: int  # accounts sampled
    store: bool  # the balance store ran its made-up call (False: not SQL, or no funded account)
    elapsed_ms: float


def sample_accounts(engine: Engine, *, limit: int = LIVE_ACCOUNTS_LIMIT) -> WarmUpSample:
    """Accounts with calls open (index ``account_id, state``), then one active customer of a
    reseller, then one active account with money: indexed or first-match reads, so a large
    accounts table does not slow the start."""
    with engine.connect() as conn:
        live = list(conn.scalars(select(Reservation.account_id).where(Reservation.state == "open")
                                 .distinct().limit(limit)))
        reseller_customer = conn.scalar(
            select(Account.id).join(Tenant, Account.tenant_id == Tenant.id)
            .where(Tenant.parent_id.is_not(None), Account.status == "active").limit(1))
        funded = conn.scalar(
            select(Account.id).where(Account.status == "active",
                                     Account.balance_micros + Account.credit_limit_micros
                                     - Account.reserved_micros > 0).limit(1))
    ordered = dict.fromkeys([*live, *(a for a in (reseller_customer, funded) if a is not None)])
    return WarmUpSample(tuple(ordered), funded)


class _ReadsAhead(Protocol):
    def read_ahead(self, account_id: str, at_ms: int) -> None: ...


def warm_up(engine: Engine, *, rater: _ReadsAhead, store: object, node: str, now_ms: int, budget_s: float = 2.0,
            monotonic: Callable[[], float] = time.monotonic) -> WarmUpReport | None:
    """Read the sampled accounts' look-ups into the caches (``PlanRater.read_ahead``: the rater
    owns what a call reads) and compile the store's statements; None when the database could not
    even be sampled (logged)."""
    started = monotonic()
    try:
        sample = sample_accounts(engine)
    except SQLAlchemyError as exc:
        log.warning("warm-up skipped: the accounts to warm could not be read (%s); the first calls read "
                    "and compile as they come", exc.__class__.__name__)
        return None
    stored = False
    if isinstance(store, SqlBalanceStore) and sample.funded is not None:
        try:
            stored = store.warm_up(sample.funded, node, now_ms)
        except SQLAlchemyError as exc:
            log.warning("warm-up: the balance store's made-up call failed (%s); rolled back",
                        exc.__class__.__name__)
    warmed = 0
    for account_id in sample.accounts:
        if monotonic() - started >= budget_s:
            log.info("warm-up: time budget of %.1f s spent after %d of %d accounts", budget_s, warmed,
                     len(sample.accounts))
            break
        try:
            rater.read_ahead(account_id, now_ms)
        except Exception as exc:  # noqa: BLE001 - the call will read it again and refuse or serve as it must
            log.warning("warm-up: account %r not read (%s: %s)", account_id, exc.__class__.__name__, exc)
            continue
        warmed += 1
    return WarmUpReport(warmed, len(sample.accounts), stored, (monotonic() - started) * 1000)
