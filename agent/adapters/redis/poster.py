"""Ledger writes of closed calls, off the balance store's deadline.

A settle, release or expiry is one Lua script in Redis (milliseconds); writing the call's ledger
entries to SQL is a transaction on a shared database that can take longer than the whole store
deadline (``billing.store_timeout_ms``, 250 ms by default) when the database is busy. Inside the
deadline, a slow database made settles miss it: the guard opened its circuit and, under
``fail_closed``, live calls were cut; every later settle was journaled and its replay met the same
deadline (seen in ``bench/bench_nodes.py``). So the daemon's store hands the SQL part to this
poster: the script's answer is the step's answer, and a greenlet writes the ledger right after.

Nothing is lost if the process dies first: a closed call stays in Redis (its account's unposted
set, and the sweeper's index, due ``RETRY_PENDING_MS`` later), and any node's sweeper posts it
(posting is idempotent per ledger reference). Each job is keyed (call or account), so a call
queued twice (a settle, then a sweep that found it still unposted) is written once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import gevent.event

from agent.services.call_path import CALL_PATH

log = logging.getLogger(__name__)

MAX_QUEUED = 100_000  # beyond it jobs are left to the sweepers (they are in Redis's index anyway)
BATCH = 200  # jobs per wake-up before yielding to other greenlets


class LedgerPoster:
    """A queue of keyed jobs (each returns True once its rows are in SQL) and the greenlet that
    runs them in order. A job that returns False or raises has already put its call back in the
    sweeper's index (``post_call`` does, via the store): it is dropped from here."""

    def __init__(self) -> None:
        self._jobs: dict[str, Callable[[], bool]] = {}
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self._greenlet: gevent.Greenlet[[], None] | None = None
        self._dropped = 0
        self.posted = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def submit(self, key: str, job: Callable[[], bool]) -> None:
        if key not in self._jobs and len(self._jobs) >= MAX_QUEUED:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 10_000 == 0:
                log.error("ledger poster: %d jobs queued, %d left to the sweepers (is SQL down?)", len(self._jobs),
                          self._dropped)
            return
        self._jobs[key] = job
        self._idle.clear()
        self._wake.set()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
            self._greenlet.link_exception(lambda g: log.critical("ledger poster died: %r", g.exception))

    def run_once(self, limit: int = BATCH) -> int:
        """Run up to ``limit`` queued jobs, oldest first; returns how many wrote their rows."""
        done = 0
        for _ in range(min(limit, len(self._jobs))):
            CALL_PATH.yield_to_calls()
            key = next(iter(self._jobs))
            job = self._jobs.pop(key)
            try:
                ok = job()
            except Exception as exc:  # SQL failures are logged by the job; Redis's must not stop the others
                log.error("ledger post of %r failed, left to the sweepers: %s", key, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                ok = False
            if ok:
                done += 1
                self.posted += 1
            else:
                self.failed += 1
        if not self._jobs:
            self._idle.set()
        return done

    def drain(self, timeout_s: float) -> bool:
        """Wait until the queue is empty (True) or ``timeout_s`` passed (False)."""
        if not self._jobs:
            return True
        if self._greenlet is None or self._greenlet.dead:
            with gevent.Timeout(timeout_s, False):
                while self._jobs:
                    self.run_once()
            return not self._jobs
        return bool(self._idle.wait(timeout=timeout_s))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (at most ``timeout_s``), then stop; the rest stays for the sweepers."""
        drained = self.drain(timeout_s)
        if self._greenlet is not None:
            self._greenlet.kill(timeout=1.0)
            self._greenlet = None
        if not drained:
            log.warning("ledger poster stopped with %d calls not written; any node's sweeper writes them",
                        len(self._jobs))
        self._jobs.clear()
        self._idle.set()

    def _run(self) -> None:
        while True:
            if not self._jobs:
                self._wake.clear()
                self._wake.wait(timeout=5.0)
                continue
            self.run_once()
            gevent.sleep(0)  # let the engine and the PBX edges run between batches
