"""Alert queues on disk: what the alert service, the webhook and the Redis Stream have not
delivered yet survives a restart, a ``kill -9`` and (once fsynced) a power loss.

:class:`LineSpool` is a file of lines appended with one ``O_APPEND`` write each (in the kernel
when ``append`` returns: a ``kill -9`` of the agent loses none) and a second file holding the byte
offset of the first line not consumed yet, replaced atomically when a consumer moves on. ``sync``
fsyncs what was appended since the last one (the alert service runs it every
``SYNC_INTERVAL_S`` in gevent's thread pool: grouped, never on the hub, as the CDR spool and the
balance journal do). Once every line is consumed both files are emptied. A line torn by a power
loss (no newline at the end of the file) is cut off at open, so the next append starts clean.
Consumption is at least once: a crash between a delivery and the offset's update delivers that
batch again (the SQL writer drops rows it already has; webhook and Stream receivers see the same
``event_id``).

:class:`AlertSpool` is a queue of :class:`AlertRecord` on a LineSpool (one JSON object a line):
the queue of the alert service (rows for the ``alerts`` table) and of the Redis Stream.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from agent.core.fraud import AlertRecord
from agent.services.alerts import AlertBatch

log = logging.getLogger(__name__)

MAX_SPOOL_BYTES = 256 * 1024 * 1024  # beyond this an alert is refused (logged): the disk must not fill up


class LineSpool:
    def __init__(self, path: Path, offset_path: Path | None = None, *, max_bytes: int = MAX_SPOOL_BYTES) -> None:
        self.path = path
        self.offset_path = offset_path or path.with_suffix(".offset")
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        self._dirty = False
        self.syncs = 0
        self._cut_torn_tail()
        self._size = os.fstat(self._fd).st_size
        self.offset = self._read_offset()
        if self.offset > self._size:  # the data file was emptied after the offset was saved
            self.offset = 0
        self._pending = self._count_lines(self.offset)

    def _cut_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if not size:
            return
        with open(self.path, "rb") as spool:
            spool.seek(max(0, size - 65536))
            tail = spool.read()
        if tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else max(0, size - len(tail))
        log.error("%s: a torn last line (%d bytes, a crash mid-write) cut off", self.path, size - keep)
        os.ftruncate(self._fd, keep)

    def _read_offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or "0")
        except FileNotFoundError:
            return 0
        except ValueError:
            log.error("%s: unreadable offset: starting from the beginning (alerts may be delivered twice)",
                      self.offset_path)
            return 0

    def _count_lines(self, offset: int) -> int:
        with open(self.path, "rb") as spool:
            spool.seek(offset)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: spool.read(1 << 20), b""))

    def __len__(self) -> int:
        """Lines appended and not consumed yet."""
        return self._pending

    def append(self, line: bytes) -> bool:
        """One line (without its newline); False when the spool is full (the caller logs it)."""
        data = line + b"\n"
        if self._size + len(data) > self.max_bytes:
            return False
        os.write(self._fd, data)
        self._size += len(data)
        self._pending += 1
        self._dirty = True
        return True

    def read(self, max_lines: int) -> tuple[list[bytes], int]:
        """Up to ``max_lines`` complete lines from the offset (without newlines) and the offset
        after them (give it to :meth:`advance` once they are delivered)."""
        lines: list[bytes] = []
        offset = self.offset
        with open(self.path, "rb") as spool:
            spool.seek(offset)
            while len(lines) < max_lines:
                line = spool.readline()
                if not line.endswith(b"\n"):
                    break
                lines.append(line[:-1])
                offset += len(line)
        return lines, offset

    def advance(self, offset: int, lines: int) -> None:
        """``lines`` lines up to ``offset`` are consumed; when nothing is left, empty the spool."""
        self.offset = offset
        self._pending = max(0, self._pending - lines)
        if offset >= self._size:
            os.ftruncate(self._fd, 0)
            self._size = 0
            self.offset = 0
            self._pending = 0
        tmp = self.offset_path.with_name(self.offset_path.name + ".tmp")
        tmp.write_text(str(self.offset))
        os.replace(tmp, self.offset_path)

    def sync(self) -> None:
        """fsync what was appended since the last call (cheap when nothing was)."""
        if not self._dirty:
            return
        self._dirty = False
        os.fsync(self._fd)
        self.syncs += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class AlertSpool:
    """A durable queue of alerts (the ``AlertQueue`` of ``agent/services/alerts.py``)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_SPOOL_BYTES) -> None:
        self.spool = LineSpool(path, max_bytes=max_bytes)
        self.path = path
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.spool)

    def append(self, record: AlertRecord) -> None:
        line = json.dumps(record.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()
        if not self.spool.append(line):
            self.dropped += 1
            log.error("alert spool %s full (%d bytes): alert not kept: %s", self.path, self.spool.max_bytes, record)

    def take(self, max_records: int) -> AlertBatch:
        lines, end = self.spool.read(max_records)
        records = []
        for line in lines:
            try:
                records.append(AlertRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
                log.error("%s: unreadable alert skipped (%s): %r", self.path, exc, line[:200])
        return AlertBatch(records, (end, len(lines)))

    def done(self, batch: AlertBatch) -> None:
        end, lines = batch.position
        self.spool.advance(end, lines)

    def sync(self) -> None:
        self.spool.sync()

    def close(self) -> None:
        self.spool.close()
