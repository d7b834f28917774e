"""The local CDR spool: order, replay after a restart, damaged and truncated files, disk full."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.cdr.spool import HEADER, Spool, frame
from agent.services.cdr_pipeline import SpoolError, SpoolFull, SpoolLocked, SpoolPosition


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [b'{"call_id":"call-%06d","pad":"%s"}' % (i, b"x" * (i % 37)) for i in range(start, start + n)]


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    """Read and commit everything, as the writer does once SQL committed each batch."""
    out: list[bytes] = []
    while True:
        read = spool.read(batch)
        out += [e.payload for e in read.entries]
        spool.commit(read.end)
        if not read.entries and not read.damaged:
            return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.cdr"))


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_records_replay_in_order_across_segments_and_restarts(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=2_000)
    for p in payloads(300):
        spool.append(p)
    assert len(segments(spool_dir)) > 5
    first = spool.read(40)
    assert [e.payload for e in first.entries] == payloads(40)
    spool.commit(first.end)
    second = spool.read(25)  # read, never committed: the agent dies before SQL commits
    assert [e.payload for e in second.entries] == payloads(25, 40)
    spool.close()

    again = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=2_000)
    assert drain(again) == payloads(260, 40)  # from the committed place, in order, nothing skipped
    assert segments(spool_dir) == [] and again.backlog_bytes() == 0
    again.append(b'{"after":"restart"}')
    assert drain(again) == [b'{"after":"restart"}']
    again.close()


def test_a_segment_of_an_earlier_run_is_never_appended_to(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    spool.append(b"one")
    spool.close()
    spool = Spool(spool_dir, max_bytes=1 << 20)
    spool.append(b"two")
    assert [p.name for p in segments(spool_dir)] == ["seg-000000000001.cdr", "seg-000000000002.cdr"]
    assert drain(spool) == [b"one", b"two"]
    spool.close()


def test_committed_entries_leave_the_spool_and_backlog_counts_the_rest(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=500)
    for p in payloads(50):
        spool.append(p)
    total = spool.backlog_bytes()
    assert total == sum(len(frame(p)) for p in payloads(50))
    read = spool.read(20)
    assert spool.backlog_bytes() == total  # read is not committed
    spool.commit(read.end)
    assert spool.backlog_bytes() == total - sum(len(frame(p)) for p in payloads(20))
    assert all(int(p.stem[4:]) >= read.end.segment for p in segments(spool_dir))
    with pytest.raises(ValueError):
        spool.commit(SpoolPosition(read.end.segment + 99, 0))  # never past what was read
    spool.close()


def test_a_corrupt_record_is_quarantined_and_the_intact_ones_around_it_replay(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    records = payloads(20)
    for p in records:
        spool.append(p)
    spool.close()
    path = segments(spool_dir)[0]
    data = bytearray(path.read_bytes())
    tenth = sum(len(frame(p)) for p in records[:10])
    data[tenth + HEADER.size + 5] ^= 0x20  # one flipped bit inside record 10
    path.write_bytes(bytes(data))

    spool = Spool(spool_dir, max_bytes=1 << 20)
    assert drain(spool) == records[:10] + records[11:]
    assert spool.damaged_regions == 1
    bad = spool_dir / "quarantine" / f"seg-000000000001@{tenth:012d}.bad"
    assert bad.read_bytes() == frame(records[10])[:HEADER.size + 5] + bytes([records[10][5] ^ 0x20]) + records[10][6:]
    assert "checksum mismatch" in bad.with_suffix(".txt").read_text()
    spool.close()


def test_a_truncated_tail_is_quarantined_not_dropped(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    records = payloads(5)
    for p in records:
        spool.append(p)
    spool.close()
    path = segments(spool_dir)[0]
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # power lost halfway through the last write

    spool = Spool(spool_dir, max_bytes=1 << 20)
    assert drain(spool) == records[:4]
    quarantined = list((spool_dir / "quarantine").glob("*.bad"))
    assert [q.read_bytes() for q in quarantined] == [frame(records[4])[:-7]]
    assert "truncated record" in quarantined[0].with_suffix(".txt").read_text()
    assert "CDR spool damage" in caplog.text
    spool.close()


def test_random_damage_never_yields_garbage_and_loses_only_the_damaged_records(spool_dir: Path) -> None:
    rng = random.Random(7)
    records = payloads(80)
    frames = [frame(p) for p in records]
    starts = [sum(len(f) for f in frames[:i]) for i in range(len(frames))]
    for trial in range(25):
        directory = spool_dir / str(trial)
        spool = Spool(directory, max_bytes=1 << 20)
        for p in records:
            spool.append(p)
        spool.close()
        path = segments(directory)[0]
        data = bytearray(path.read_bytes())
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randrange(1, 60))
        for i in range(a, b):
            data[i] = rng.randrange(256)
        if trial % 3 == 0:
            data = data[:b]  # and the file ends there
        path.write_bytes(bytes(data))
        untouched = [p for p, s, f in zip(records, starts, frames, strict=True)
                     if s + len(f) <= a or (s >= b and s + len(f) <= len(data))]
        spool = Spool(directory, max_bytes=1 << 20)
        got = drain(spool, batch=9)
        assert [p for p in got if p not in records] == []
        assert [p for p in got if p in untouched] == untouched
        assert (spool.damaged_regions > 0) == (got != records)
        spool.close()


class FullDisk:
    """A write(2) that writes part of the frame, then fails with ENOSPC, while ``full``."""

    def __init__(self) -> None:
        self.full = False

    def __call__(self, fd: int, data: bytes) -> int:
        if not self.full:
            return os.write(fd, data)
        if len(data) > 5:
            return os.write(fd, data[:5])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_raises_a_clear_error_and_leaves_no_torn_frame(spool_dir: Path) -> None:
    disk = FullDisk()
    spool = Spool(spool_dir, max_bytes=1 << 20, write=disk)
    spool.append(b"before")
    disk.full = True
    with pytest.raises(SpoolError, match="disk full"):
        spool.append(b"lost-in-the-full-disk")
    disk.full = False
    spool.append(b"after")
    assert drain(spool) == [b"before", b"after"]
    assert spool.damaged_regions == 0
    spool.close()


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """A real EFBIG from the kernel (RLIMIT_FSIZE) instead of a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_the_kernel_refusing_a_write_loses_no_spooled_record(spool_dir: Path, file_size_limit: None) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    spool.append(b"x" * 100)  # creates the segment before the limit applies
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    accepted, refused = [], 0
    for p in payloads(20):
        try:
            spool.append(p)
            accepted.append(p)
        except SpoolError:
            refused += 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    assert refused > 0 and accepted
    assert drain(spool) == [b"x" * 100, *accepted]
    assert spool.damaged_regions == 0
    spool.close()


def test_the_spool_bound_refuses_records_loudly(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(spool_dir, max_bytes=300)
    spool.append(b"a" * 200)
    with pytest.raises(SpoolFull, match="spool full"):
        spool.append(b"b" * 200)
    assert "is FULL" in caplog.text
    assert drain(spool) == [b"a" * 200]
    spool.append(b"b" * 200)  # room again once the backlog reached SQL
    spool.close()


def test_one_process_owns_a_spool(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    with pytest.raises(SpoolLocked, match=f"in use by process {os.getpid()}"):
        Spool(spool_dir, max_bytes=1 << 20)
    spool.close()
    Spool(spool_dir, max_bytes=1 << 20).close()


def test_an_unreadable_committed_file_replays_everything(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_bytes=1 << 20)
    for p in payloads(3):
        spool.append(p)
    spool.close()
    (spool_dir / "committed").write_text("garbage")
    spool = Spool(spool_dir, max_bytes=1 << 20)
    assert drain(spool) == payloads(3)  # SQL's unique keys skip what it already has
    spool.close()


def test_a_segment_retired_during_an_fsync_is_closed_only_after_its_own(spool_dir: Path) -> None:
    """The pipeline's fsync yields (gevent's thread pool); appends that roll to a new segment
    meanwhile must not get the segment they retire closed before it was fsync'd."""
    spool = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=100)
    spool.append(payloads(1)[0])
    rolled = False

    def fsync_while_appending(fd: int) -> None:
        nonlocal rolled
        if not rolled:
            rolled = True
            for p in payloads(4, 1):  # retires the segment being fsync'd, starts others
                spool.append(p)
        os.fsync(fd)

    spool.sync(fsync_while_appending)
    spool.sync(os.fsync)  # raised EBADF: the first sync had closed the retired segment
    spool.append(payloads(1, 5)[0])
    spool.sync(os.fsync)
    assert drain(spool) == payloads(6)
    spool.close()


def test_sync_fsyncs_the_written_segments(spool_dir: Path) -> None:
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        os.fsync(fd)

    spool = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=100)
    for p in payloads(6):
        spool.append(p)
    spool.sync(fsync)
    assert len(synced) >= 3  # every segment written, and the folder that lists them
    synced.clear()
    spool.sync(fsync)
    assert synced == []  # nothing new
    spool.close()
