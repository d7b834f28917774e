"""A local journal of the calls this node authorized: what an agent killed before it published
them (``live_calls``, every ``daemon.publish_seconds``) leaves for its next start.

Found by bench/bench_faults.py: a call authorized less than a publish interval before a kill -9
and ended before the restart was known to the next run only by its reservation (account, no
destination, no leg): it was settled as NO ANSWER for what its nibbles had debited, its PBX
CDR line unused. One line per authorized call, appended with one ``write`` on an ``O_APPEND``
descriptor: a few microseconds, and the kernel keeps it through a kill -9 of the process (a
crash of the whole host takes the PBX's calls with it). No fsync, on purpose: this is on the
authorize path.

The file is rotated to ``.1`` past ``max_bytes`` (both are read at start); the next start reads
it, then begins a new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "authorized.jsonl"
MAX_BYTES = 4 * 1024 * 1024  # tens of thousands of calls: far more than one publish interval holds


class AuthorizedJournal:
    def __init__(self, folder: str | Path, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = Path(folder) / FILE_NAME
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0

    def read(self) -> dict[str, dict[str, object]]:
        """What an earlier run wrote: call id -> its facts (the rotated file first). Lines that
        make no sense (a write cut by the kill) are skipped and counted in the log."""
        facts: dict[str, dict[str, object]] = {}
        bad = 0
        for path in (self.path.with_name(FILE_NAME + ".1"), self.path):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.error("authorized-calls journal %s: %s; calls the earlier run had not published yet are "
                          "settled from what the balance store knows", path, exc.strerror or exc)
                continue
            for number, line in enumerate(data.splitlines(), 1):
                try:
                    entry = json.loads(line)
                    facts[str(entry["call_id"])] = entry
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    if bad == 1:
                        log.warning("authorized-calls journal %s line %d: not a journal entry (skipped)", path, number)
        return facts

    def start(self) -> None:
        """Begin a new journal (after ``read``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_name(FILE_NAME + ".1").unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        self._size = 0

    def append(self, *, call_id: str, pbx: str, a_leg_id: str, account_id: str, destination: str, caller: str,
               authorized_ms: int) -> None:
        if self._fd is None:
            return
        line = json.dumps({"call_id": call_id, "pbx": pbx, "a_leg_id": a_leg_id, "account_id": account_id,
                           "destination": destination, "caller": caller, "authorized_ms": authorized_ms},
                          separators=(",", ":")).encode() + b"\n"
        try:
            if self._size + len(line) > self.max_bytes:
                self._rotate()
            os.write(self._fd, line)
            self._size += len(line)
        except OSError as exc:  # a full disk must not refuse calls: the live_calls publish still runs
            log.error("authorized-calls journal %s: %s (call=%s not journaled)", self.path, exc.strerror or exc,
                      call_id)

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        os.replace(self.path, self.path.with_name(FILE_NAME + ".1"))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        self._size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
