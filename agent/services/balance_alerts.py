"""Low balance and balance exhausted alerts (DESIGN §8), raised after settled calls.

``BalanceWatch.finished`` is an engine ``on_finished`` hook: it runs in the engine loop, so it
only notes the account (a call with a cost, or one the agent cut) and wakes a worker greenlet.
The worker reads the account's threshold (``threshold_of``: the account's, else its plan's,
cached: ``agent/adapters/sql/low_balance.py``; None: the account is not watched and costs
nothing more) and then its available money from the balance store (``account_state``: with
Redis the figure every node shares), and asks :class:`agent.core.low_balance.Crossings` whether
the account just crossed down: ``low_balance`` below the threshold, ``balance_exhausted`` at or
below zero or when the call was cut because the money ran out. The alert goes to the alert service
(throttled there: one per account and kind per ``fraud.alert_period_seconds``).

Per node: each daemon remembers the crossings of the calls it settled, in memory. With several
nodes an account's crossing is alerted by each node that settles one of its calls below the
threshold (at most once per node); after a restart an account still below its threshold is
alerted once more at its next settled call. Several settles of one account that wait together are
checked once. A threshold or a balance that cannot be read (database or store away) skips that
check: the account's next settled call checks again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.event

from agent.core.balance import AccountState
from agent.core.cdr import CallRecord, Disposition
from agent.core.low_balance import Crossings, Level, balance_alert, level_of, nibble_cost
from agent.ports import Clock
from agent.services.alerts import Alerts

log = logging.getLogger(__name__)

MAX_PENDING = 100_000  # accounts waiting for a check (beyond: the newest settles are not checked)


@dataclass(frozen=True, slots=True)
class _Settled:
    call_id: str
    destination: str
    at_ms: int
    cut: bool
    next_nibble_micros: int


class BalanceWatch:
    def __init__(self, alerts: Alerts, *, threshold_of: Callable[[str], int | None],
                 account_state: Callable[[str], AccountState], node: str, clock: Clock, nibble_seconds: int,
                 max_pending: int = MAX_PENDING) -> None:
        self.alerts = alerts
        self.threshold_of = threshold_of
        self.account_state = account_state
        self.node = node
        self.clock = clock
        self.nibble_seconds = nibble_seconds
        self.max_pending = max_pending
        self.crossings = Crossings()
        self._pending: OrderedDict[str, _Settled] = OrderedDict()
        self._wake = gevent.event.Event()
        self._worker: gevent.Greenlet[[], None] | None = None
        self.checks = 0  # balances read
        self.skipped = 0  # checks given up (threshold or balance unreadable, queue full)
        self.raised = 0
        self._failures = 0

    # ---------------------------------------------------------------- the engine loop side

    def finished(self, record: CallRecord) -> None:
        """A settled call (engine ``on_finished``): note its account, and the account of each
        reseller level above it that the call charged (DESIGN §11: a reseller's own money runs
        low through its customers' calls, and its threshold is set on that account like any
        other); never waits."""
        cut = record.disposition is Disposition.CUT
        at_ms = record.settled_ms or record.ended_ms or self.clock.now_ms()
        if record.rating.cost_micros > 0 or cut:
            self._note(record.account_id, _Settled(record.call_id, record.destination, at_ms, cut,
                                                   nibble_cost(record.rating.rate_micros, self.nibble_seconds)))
        for level in record.upper:
            # A cut is the customer's: which level's money ran out is not recorded, so an upper
            # level is checked for low balance and for exhausted at zero only.
            if level.account_id and level.cost_micros > 0:
                self._note(level.account_id, _Settled(record.call_id, record.destination, at_ms, False,
                                                      nibble_cost(level.rate_micros, self.nibble_seconds)))

    def _note(self, account_id: str, settled: _Settled) -> None:
        prior = self._pending.get(account_id)
        if prior is None and len(self._pending) >= self.max_pending:
            self.skipped += 1
            return
        if prior is None or settled.cut or not prior.cut:  # a cut waiting for its check is kept
            self._pending[account_id] = settled
        self._wake.set()

    # ---------------------------------------------------------------- the worker

    def check_once(self) -> int:
        """Check every account noted so far; returns how many alerts were raised."""
        raised = 0
        while self._pending:
            account_id, settled = self._pending.popitem(last=False)
            if self.check(account_id, settled):
                raised += 1
        return raised

    def check(self, account_id: str, settled: _Settled) -> bool:
        try:
            threshold = self.threshold_of(account_id)
        except Exception as exc:  # noqa: BLE001 - the database away and never read: the next settle checks
            self._skip(account_id, "threshold", exc)
            return False
        if threshold is None:
            self.crossings.observe(account_id, Level.ABOVE)  # not watched (any more): forget its level
            return False
        try:
            state = self.account_state(account_id)
        except Exception as exc:  # noqa: BLE001 - the store away, the account deleted: the next settle checks
            self._skip(account_id, "available money", exc)
            return False
        self.checks += 1
        self._failures = 0
        available = state.available_micros
        level = level_of(available, threshold, cut=settled.cut, next_nibble_micros=settled.next_nibble_micros)
        crossed = self.crossings.observe(account_id, level)
        if crossed is None:
            return False
        record = balance_alert(crossed, at_ms=settled.at_ms, node=self.node, account_id=account_id,
                               available_micros=available, threshold_micros=threshold, call_id=settled.call_id,
                               destination=settled.destination, cut=settled.cut)
        if self.alerts.submit(record):
            self.raised += 1
            return True
        return False

    def _skip(self, account_id: str, what: str, exc: Exception) -> None:
        self.skipped += 1
        self._failures += 1
        if self._failures == 1 or self._failures % 100 == 0:
            log.warning("low-balance check of account %s skipped: %s not read (%s: %s; %d skipped so far)",
                        account_id, what, exc.__class__.__name__, exc, self.skipped)

    def start(self) -> None:
        self._worker = gevent.spawn(self._run)
        self._worker.link_exception(lambda g: log.critical("low-balance watch died: %r", g.exception))

    def stop(self, timeout_s: float = 1.0) -> None:
        if self._worker is not None:
            self._worker.kill(timeout=timeout_s)
            self._worker = None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.check_once()
