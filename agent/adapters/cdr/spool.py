"""The node's local CDR spool: append-only segment files of framed, checksummed records.

Layout of the spool folder (``cdr.spool_dir``)::

    lock                        flock of the one process that owns the spool (it holds its pid)
    committed                   "SEGMENT OFFSET": every record before this place is in SQL
    seg-000000000042.cdr        segments, oldest first; a process appends only to a segment it
                                created, so the segments of an earlier (crashed) run never change
    quarantine/                 damaged bytes found while reading, and records nothing would take,
                                each with a ``.txt`` that says where they came from and why

A frame is ``MAGIC (4 bytes) | length (u32 BE) | crc32(length, payload) (u32 BE) | payload``.
``MAGIC`` starts with 0xFF, a byte that never occurs in UTF-8 text, so that after a damaged frame
the reader finds the next intact one by searching for it.

Durability: ``append`` is one ``write(2)`` to a file opened with O_APPEND; when it returns, the
record is in the kernel and survives ``kill -9`` of the agent. ``sync`` fsyncs the segments
written since the last sync (the pipeline does it every ``fsync_interval_ms``: a group commit),
after which the record also survives a power loss. The ``committed`` file is replaced atomically
but not fsync'd: after a power loss it may be older than SQL, which only makes the replay
re-insert rows that the unique keys then skip.

Damage: a frame whose header or checksum is wrong, or a truncated tail, is copied to
``quarantine/`` with the reason, logged and counted, and reading resumes at the next intact
frame; the damaged bytes leave the spool with the segment only after that copy succeeded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent.services.cdr_pipeline import (
    SpoolEntry,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolPosition,
    SpoolRead,
)

log = logging.getLogger(__name__)

MAGIC = b"\xffCDR"
HEADER = struct.Struct(">4sII")
LENGTH = struct.Struct(">I")
MAX_RECORD_BYTES = 1 << 20
DEFAULT_SEGMENT_BYTES = 16 << 20
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".cdr"

Writer = Callable[[int, bytes], int]


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"a spooled record is at most {MAX_RECORD_BYTES} bytes, not {len(payload)}")
    crc = zlib.crc32(payload, zlib.crc32(LENGTH.pack(len(payload))))
    return HEADER.pack(MAGIC, len(payload), crc) + payload


def _frame_at(data: bytes, i: int) -> int | None:
    """The end of an intact frame starting at ``i``; None if there is none (yet) there."""
    if len(data) - i < HEADER.size:
        return None
    magic: bytes
    length: int
    crc: int
    magic, length, crc = HEADER.unpack_from(data, i)
    if magic != MAGIC or length > MAX_RECORD_BYTES:
        return None
    end = i + HEADER.size + length
    if end > len(data):
        return None
    body = memoryview(data)[i + HEADER.size:end]
    if zlib.crc32(body, zlib.crc32(LENGTH.pack(length))) != crc:
        return None
    return end


def _incomplete_tail(data: bytes, i: int) -> bool:
    """True when ``data[i:]`` is the beginning of a frame that is still being written."""
    rest = len(data) - i
    if rest < HEADER.size:
        return MAGIC.startswith(data[i:i + min(rest, len(MAGIC))])
    magic: bytes
    length: int
    magic, length, _ = HEADER.unpack_from(data, i)
    return magic == MAGIC and length <= MAX_RECORD_BYTES and i + HEADER.size + length > len(data)


def scan(data: bytes, start: int, limit: int, *, final: bool) -> tuple[list[tuple[int, bytes]], int,
                                                                      list[tuple[int, int, str]]]:
    """Parse frames in ``data[start:]``: (frames as (offset, payload), end of what was consumed,
    damaged ranges as (start, end, reason)). ``final`` says no more bytes will come: a
    truncated tail is then damage, not a frame in progress."""
    frames: list[tuple[int, bytes]] = []
    damaged: list[tuple[int, int, str]] = []
    i = start
    size = len(data)
    unpack, head, crc32, pack_length = HEADER.unpack_from, HEADER.size, zlib.crc32, LENGTH.pack
    while i < size and len(frames) < limit:
        # _frame_at inlined: this loop runs once per record of a replay
        if size - i >= head:
            magic, length, crc = unpack(data, i)
            end = i + head + length
            if magic == MAGIC and length <= MAX_RECORD_BYTES and end <= size:
                body = data[i + head:end]
                if crc32(body, crc32(pack_length(length))) == crc:
                    frames.append((i, body))
                    i = end
                    continue
        if not final and _incomplete_tail(data, i):
            break
        reason = _damage_reason(data, i)
        j = data.find(MAGIC, i + 1)
        while j != -1 and _frame_at(data, j) is None:
            j = data.find(MAGIC, j + 1)
        if j == -1 and not final:
            break  # an active segment: what follows may still be a frame being written
        stop = len(data) if j == -1 else j
        damaged.append((i, stop, reason))
        i = stop
    return frames, i, damaged


def _damage_reason(data: bytes, i: int) -> str:
    if len(data) - i < HEADER.size:
        return f"truncated frame header ({len(data) - i} of {HEADER.size} bytes)"
    magic, length, _ = HEADER.unpack_from(data, i)
    if magic != MAGIC:
        return f"no frame marker (found {magic!r})"
    if length > MAX_RECORD_BYTES:
        return f"implausible record length {length}"
    if i + HEADER.size + length > len(data):
        return f"truncated record ({len(data) - i - HEADER.size} of {length} bytes)"
    return "checksum mismatch"


class Spool:
    """Implements ``CdrSpool`` (agent/services/cdr_pipeline.py). One owner process at a time."""

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, write: Writer = os.write) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Several segments fit in the bound, so that committed ones can be deleted to make room.
        self.segment_bytes = min(segment_bytes, max(1, max_bytes // 8))
        self._write = write
        self.quarantine_dir = self.directory / "quarantine"
        try:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"{self.directory}: cannot create the CDR spool folder: {exc.strerror}") from None
        self._lock_fd = self._take_lock()
        self._committed = self._read_committed()
        self._sizes: dict[int, int] = {}
        for number in self._segment_numbers():
            if number < self._committed.segment:
                self._unlink(number)  # committed before a crash, not yet deleted
            else:
                self._sizes[number] = self._path(number).stat().st_size
        self._active: int | None = None
        self._active_fd: int | None = None
        self._next_segment = max([*self._sizes, self._committed.segment]) + 1
        self._dirty: set[int] = set()
        self._retired: set[int] = set()
        self._dir_dirty = False
        self._read_pos = self._committed
        self._buf = b""
        self._buf_segment: int | None = None
        self._buf_start = 0
        self.damaged_regions = 0
        self._full_logged = False

    # ------------------------------------------------------------------ files and the lock

    def _path(self, number: int) -> Path:
        return self.directory / f"{SEGMENT_PREFIX}{number:012d}{SEGMENT_SUFFIX}"

    def _segment_numbers(self) -> list[int]:
        numbers = []
        for path in self.directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"):
            digits = path.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]
            if digits.isdigit():
                numbers.append(int(digits))
        return sorted(numbers)

    def _take_lock(self) -> int:
        path = self.directory / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SpoolLocked(f"{self.directory}: the CDR spool is in use by process {owner} "
                              "(a running agent replays it by itself)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _read_committed(self) -> SpoolPosition:
        path = self.directory / "committed"
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return SpoolPosition(0, 0)
        except (OSError, UnicodeDecodeError) as exc:
            raise SpoolError(f"{path}: cannot read the committed position: {exc}") from None
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            # Safe fallback: replay everything; the unique keys skip what SQL already has.
            log.error("%s: unreadable committed position %r; replaying the whole spool", path, text[:40])
            return SpoolPosition(0, 0)
        return SpoolPosition(int(parts[0]), int(parts[1]))

    def close(self) -> None:
        for fd in {*self._dirty, *self._retired, *([self._active_fd] if self._active_fd is not None else [])}:
            try:
                os.close(fd)
            except OSError:
                log.warning("closing a spool segment failed", exc_info=True)
        self._dirty.clear()
        self._retired.clear()
        self._active = self._active_fd = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------------ appending

    def disk_bytes(self) -> int:
        return sum(self._sizes.values())

    def append(self, payload: bytes) -> None:
        data = frame(payload)
        if self.disk_bytes() + len(data) > self.max_bytes:
            self._reclaim_active()
        if self.disk_bytes() + len(data) > self.max_bytes:
            if not self._full_logged:
                log.critical("CDR spool %s is FULL (%d bytes, limit cdr.spool_max_mb = %d bytes): new CDRs "
                             "are refused until the database takes the backlog", self.directory,
                             self.disk_bytes(), self.max_bytes)
                self._full_logged = True
            raise SpoolFull(f"{self.directory}: CDR spool full ({self.disk_bytes()} of {self.max_bytes} bytes)")
        self._full_logged = False
        if self._active is None or self._segment_full(self._active, len(data)):
            self._roll()
        assert self._active is not None and self._active_fd is not None
        number, fd, before = self._active, self._active_fd, self._sizes[self._active]
        try:
            written = 0
            while written < len(data):
                count = self._write(fd, data[written:])
                if count <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
        except OSError as exc:
            self._undo_partial(number, fd, before)
            what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else exc.strerror
            raise SpoolError(f"{self._path(number)}: cannot append a CDR: {what}") from None
        self._sizes[number] = before + len(data)
        self._dirty.add(fd)

    def _reclaim_active(self) -> None:
        """Free the active segment when everything in it is already in SQL."""
        number = self._active
        if number is not None and self._committed == SpoolPosition(number, self._sizes[number]):
            self._retire()
            self._unlink(number)

    def _segment_full(self, number: int, adding: int) -> bool:
        return self._sizes[number] > 0 and self._sizes[number] + adding > self.segment_bytes

    def _undo_partial(self, number: int, fd: int, before: int) -> None:
        """Cut a torn frame off; if that fails, retire the segment (the reader quarantines it)."""
        try:
            os.ftruncate(fd, before)
        except OSError:
            log.error("cannot cut a torn CDR frame off %s; starting a new segment", self._path(number))
            self._sizes[number] = os.fstat(fd).st_size
            self._retire()

    def _roll(self) -> None:
        self._retire()
        number = self._next_segment
        path = self._path(number)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        except OSError as exc:
            raise SpoolError(f"{path}: cannot create a spool segment: {exc.strerror}") from None
        self._next_segment += 1
        self._active, self._active_fd = number, fd
        self._sizes[number] = 0
        self._dir_dirty = True

    def _retire(self) -> None:
        if self._active_fd is not None:
            self._retired.add(self._active_fd)
            self._dirty.add(self._active_fd)
        self._active = self._active_fd = None

    def sync(self, fsync: Callable[[int], None] = os.fsync) -> None:
        """``fsync`` may yield (the pipeline runs it in gevent's thread pool): a segment retired
        meanwhile is dirty again and closed by the next sync, never by this one."""
        fds, self._dirty = self._dirty, set()
        closing = fds & self._retired  # retired before these fsyncs: nothing appends to them any more
        try:
            for fd in fds:
                fsync(fd)
            if self._dir_dirty:
                self._dir_dirty = False
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            self._dirty |= fds
            raise SpoolError(f"{self.directory}: fsync failed: {exc.strerror}") from None
        for fd in closing:
            self._retired.discard(fd)
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def read(self, max_records: int) -> SpoolRead:
        start = self._read_pos
        try:
            return self._read(max_records)
        except SpoolError:
            self._read_pos = start  # the records read so far were not handed out: read them again
            raise

    def _read(self, max_records: int) -> SpoolRead:
        entries: list[SpoolEntry] = []
        damaged = 0
        while len(entries) < max_records:
            number = self._read_pos.segment
            if number not in self._sizes:
                later = [n for n in self._sizes if n > number]
                if not later:
                    break
                self._read_pos = SpoolPosition(min(later), 0)
                continue
            active = number == self._active
            data, base = self._load(number, self._read_pos.offset)
            frames, end, bad = scan(data, self._read_pos.offset - base, max_records - len(entries),
                                    final=not active)
            for start, stop, reason in bad:
                self._quarantine_region(number, base + start, data[start:stop], reason)
                damaged += 1
            entries += [SpoolEntry(SpoolPosition(number, base + off), body) for off, body in frames]
            self._read_pos = SpoolPosition(number, base + end)
            if base + end < self._sizes[number] or active:
                break  # batch full, or waiting for the rest of a frame being written
            later = [n for n in self._sizes if n > number]
            if not later:
                break
            self._read_pos = SpoolPosition(min(later), 0)
        return SpoolRead(entries, self._read_pos, damaged)

    def _load(self, number: int, offset: int) -> tuple[bytes, int]:
        """The segment's bytes from at most ``offset`` to its current end, and their file offset.
        Each byte is read from the file once; the buffer holds at most one segment."""
        size = self._sizes[number]
        buf_end = self._buf_start + len(self._buf)
        if self._buf_segment != number or not self._buf_start <= offset <= buf_end:
            self._buf, self._buf_segment, self._buf_start, buf_end = b"", number, offset, offset
        if size > buf_end:
            try:
                with open(self._path(number), "rb") as handle:
                    handle.seek(buf_end)
                    fresh = handle.read(size - buf_end)
            except OSError as exc:
                raise SpoolError(f"{self._path(number)}: cannot read: {exc.strerror}") from None
            self._buf = self._buf[offset - self._buf_start:] + fresh
            self._buf_start = offset
        return self._buf, self._buf_start

    def _quarantine_region(self, number: int, offset: int, data: bytes, reason: str) -> None:
        name = f"{self._path(number).stem}@{offset:012d}"
        where = f"{self._path(number)} at byte {offset}"
        try:
            (self.quarantine_dir / f"{name}.bad").write_bytes(data)
            (self.quarantine_dir / f"{name}.txt").write_text(
                f"source: {where}\nlength: {len(data)}\nreason: {reason}\n"
                f"found: {datetime.now(UTC).isoformat()}\n", encoding="utf-8")
        except OSError as exc:
            # Not committed past: the region stays in the spool and is tried again.
            raise SpoolError(f"{self.quarantine_dir}: cannot quarantine {len(data)} damaged bytes from "
                             f"{where}: {exc.strerror}") from None
        self.damaged_regions += 1
        log.error("CDR spool damage in %s (%d bytes, %s): quarantined in %s.bad; the intact records "
                  "around it are replayed", where, len(data), reason, self.quarantine_dir / name)

    def quarantine_payload(self, payload: bytes, reason: str) -> str:
        name = f"rejected-{hashlib.sha256(payload).hexdigest()[:20]}"
        path = self.quarantine_dir / f"{name}.json"
        try:
            path.write_bytes(payload)
            (self.quarantine_dir / f"{name}.txt").write_text(f"reason: {reason}\n", encoding="utf-8")
        except OSError as exc:
            raise SpoolError(f"{path}: cannot keep a rejected CDR: {exc.strerror}") from None
        return str(path)

    # ------------------------------------------------------------------ committing

    def commit(self, end: SpoolPosition) -> None:
        if end == self._committed:
            return
        if end > self._read_pos:
            raise ValueError(f"commit at {end} beyond what was read ({self._read_pos})")
        for number in sorted(self._sizes):
            finished = number < end.segment or (number == end.segment and number != self._active
                                                and end.offset >= self._sizes[number])
            if finished:
                self._unlink(number)
        path = self.directory / "committed"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{end.segment} {end.offset}\n", encoding="ascii")
            os.replace(tmp, path)
        except OSError as exc:
            # Harmless for correctness (an older position only replays rows SQL already has).
            log.error("%s: cannot record the committed position: %s", path, exc.strerror)
        self._committed = end

    def _unlink(self, number: int) -> None:
        try:
            self._path(number).unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolError(f"{self._path(number)}: cannot delete a committed segment: {exc.strerror}") from None
        self._sizes.pop(number, None)
        if self._buf_segment == number:
            self._buf, self._buf_segment = b"", None

    def backlog_bytes(self) -> int:
        total = self.disk_bytes()
        if self._committed.segment in self._sizes:
            total -= min(self._committed.offset, self._sizes[self._committed.segment])
        return total
