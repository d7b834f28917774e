"""SQLite's WAL checkpoints, off the daemon's loop.

In WAL mode SQLite copies the write-ahead log back into the database file once the log passes
1,000 pages (``wal_autocheckpoint``), inside whichever commit crosses that line: the pages are
written and both files fsynced, 3-4 ms on this project's test machine, about every hundred
transactions. In the daemon every SQLite transaction runs in its one gevent loop, so that commit
holds up every call's authorization meanwhile (measured: a settle's p99 3.5 ms with automatic
checkpoints, 0.6 ms without; the embedded store's post-dial delay at p99 on real PBXes, issue 13).

The daemon's connections therefore turn automatic checkpoints off (``make_engine(...,
wal_autocheckpoint=False)``) and :class:`WalCheckpointer` runs them in gevent's thread pool:
PASSIVE, so it never waits for the loop's readers or writers (SQLite lets a checkpoint and
writers work at once), on a connection of its own, and the ``sqlite3`` module releases the GIL
while SQLite works. Other processes on the same file (the operators' CLI) keep SQLite's default.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass

import gevent
import gevent.event

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
"""How often the log is copied back: at 20 calls/s the log grows by a few hundred pages a second;
a checkpoint that has little to copy is short, and the file stays small."""
TIMEOUT_S = 60.0  # one checkpoint of a very large log (after an outage of this loop) may be slow
LARGE_LOG_PAGES = 262_144
"""A log this long (1 GiB of 4 KiB pages) that the checkpoint cannot empty means a reader holds
an old snapshot open: said in the log, at most once a minute."""
WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    busy: bool  # another checkpoint held the lock, or a reader kept part of the log: later
    log_pages: int  # frames in the log
    checkpointed_pages: int  # frames now in the database file


class WalCheckpointer:
    """Copies one SQLite database's write-ahead log into its file, from another thread."""

    def __init__(self, database_path: str, *, interval_s: float = INTERVAL_S, timeout_s: float = TIMEOUT_S) -> None:
        self.database_path = database_path
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.checkpoints = 0
        self.last: CheckpointResult | None = None
        self._warned_at: float | None = None

    def checkpoint_once(self) -> CheckpointResult:
        """One PASSIVE checkpoint in the calling thread, on a connection opened and closed here
        (an ``sqlite3`` connection belongs to the thread that uses it; opening one is cheap)."""
        conn = sqlite3.connect(self.database_path, timeout=0, isolation_level=None, check_same_thread=True)
        try:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return CheckpointResult(True, -1, -1)  # another process checkpoints right now
        finally:
            conn.close()
        busy, log_pages, done = (int(value) for value in row)
        return CheckpointResult(bool(busy), log_pages, done)

    def run(self, stopping: gevent.event.Event) -> None:
        """Checkpoint every ``interval_s`` until ``stopping``, each in gevent's thread pool."""
        pool = gevent.get_hub().threadpool
        failures = 0
        while not stopping.wait(self.interval_s):
            try:
                result = pool.spawn(self.checkpoint_once).get(timeout=self.timeout_s)
            except gevent.Timeout:
                log.warning("SQLite checkpoint of %s still running after %.0f s", self.database_path, self.timeout_s)
                continue
            except (sqlite3.Error, OSError) as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.error("SQLite checkpoint of %s failed (%d times so far): %s; the write-ahead log grows "
                              "until one succeeds", self.database_path, failures, exc)
                continue
            if failures:
                log.warning("SQLite checkpoints of %s work again after %d failures", self.database_path, failures)
                failures = 0
            self.checkpoints += 1
            self.last = result
            self._warn_if_stuck(result)

    def _warn_if_stuck(self, result: CheckpointResult) -> None:
        if result.log_pages < LARGE_LOG_PAGES or result.checkpointed_pages >= result.log_pages:
            return
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("SQLite write-ahead log of %s holds %d pages and only %d could be copied back: a "
                        "reader keeps an old snapshot open (a long query or an open transaction)",
                        self.database_path, result.log_pages, result.checkpointed_pages)

