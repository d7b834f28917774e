"""The PBX's own CDR file: how calls that ended while no agent watched are billed exactly.

When the agent is down (kill -9, a crash) or its AMI/ESL connection is, calls end without it.
The balance store only knows what their nibbles debited; the PBX knows when they were answered
and when they ended. Both PBXes write CSV files on their host, one line per call (per leg on
FreeSWITCH); the agent needs three columns of them (``cdr_columns``, 1-based, "1,2,3" by
default: the shape of the shipped ``dialplan/asterisk/cdr_custom.conf``; FreeSWITCH's
mod_cdr_csv template names its own, see ``dialplan/freeswitch/README.md``)::

    "<caller's leg id>","<answer instant>","<end instant>"[,"anything else", ...]

* the leg id is Asterisk's ``${CDR(uniqueid)}`` (the caller's channel) or FreeSWITCH's
  ``${uuid}`` of the caller's leg (rows of other legs match no call and are ignored);
* an instant is epoch seconds with a fraction (Asterisk's ``answer(double)`` of an advanced
  cdr_custom mapping, or ``${CDR(answer,u)}`` of a legacy one: ``1796276920.123456``) or
  whole epoch microseconds (FreeSWITCH's ``${answer_uepoch}``) or milliseconds; empty or
  zero is "never" (not answered).

Several lines for one caller's leg (Asterisk writes one per Dial attempt, failover included)
are merged: the earliest answer, the latest end. Bytes in, values out; the adapters read the
file's tail at each resync (:func:`read_ended_calls`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import gevent
import gevent.pool

from agent.core.events import EndedCall, PbxCdrReread

log = logging.getLogger(__name__)

TAIL_BYTES = 8 * 1024 * 1024  # about 80,000 calls of the shipped format: hours of a busy PBX
_MAX_PROBLEMS = 5


class BadInstant(ValueError):
    pass


def parse_instant_ms(text: str) -> int | None:
    """An epoch instant in ms from seconds with a fraction, microseconds or milliseconds;
    None for empty or 0 ("never")."""
    raw = text.strip()
    if raw in ("", "0"):
        return None
    try:
        if "." in raw:
            value = Decimal(raw)
            if not value.is_finite() or value < 0:
                raise BadInstant(f"not an instant: {text!r}")
            return int(value * 1000) if value else None  # Asterisk's answer(double) of an unanswered call: 0.000000
        if not raw.isdigit():
            raise BadInstant(f"not an instant: {text!r}")
        digits = len(raw)
        number = int(raw)
    except InvalidOperation:
        raise BadInstant(f"not an instant: {text!r}") from None
    if digits >= 15:  # microseconds (FreeSWITCH's *_uepoch)
        return number // 1000
    if digits >= 12:  # milliseconds
        return number
    return number * 1000  # seconds


@dataclass
class CdrScan:
    """What a CDR file's lines say: the calls by caller's leg, and the lines that made no sense."""

    calls: dict[str, EndedCall] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bad_lines: int = 0


def parse_columns(text: str) -> tuple[int, int, int]:
    """``cdr_columns``: "leg id, answer, end" as 1-based column numbers, e.g. "1,5,6"."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 3 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"cdr_columns must be three column numbers from 1 (leg id, answer, end), not {text!r}")
    leg, answer, end = (int(part) - 1 for part in parts)
    return leg, answer, end


def parse_cdr_lines(data: bytes, where: str, *, columns: tuple[int, int, int] = (0, 1, 2),
                    first_line: int = 1) -> CdrScan:
    """Parse CDR lines (see the module's docstring); ``columns`` are the 0-based places of the
    leg id, the answer and the end; ``where`` names the file in problems."""
    leg_at, answer_at, end_at = columns
    needed = max(columns) + 1
    scan = CdrScan()
    text = data.decode("utf-8", "replace")
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=first_line):
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) < needed:
                raise BadInstant(f"{len(row)} fields, column {needed} is needed (cdr_columns)")
            leg_id = row[leg_at].strip()
            if not leg_id:
                raise BadInstant("no leg id")
            answered_ms = parse_instant_ms(row[answer_at])
            ended_ms = parse_instant_ms(row[end_at])
            if ended_ms is None:
                raise BadInstant("no end instant")
            if answered_ms is not None and answered_ms > ended_ms:
                raise BadInstant(f"answered after it ended ({row[answer_at]} > {row[end_at]})")
        except BadInstant as exc:
            scan.bad_lines += 1
            if len(scan.problems) < _MAX_PROBLEMS:
                scan.problems.append(f"{where}, line {number}: {exc}")
            continue
        known = scan.calls.get(leg_id)
        if known is not None:
            answers = [ms for ms in (known.answered_ms, answered_ms) if ms is not None]
            answered_ms = min(answers) if answers else None
            ended_ms = max(known.ended_ms, ended_ms)
        scan.calls[leg_id] = EndedCall(leg_id, answered_ms, ended_ms)
    return scan


def read_ended_calls(path: str | Path, *, columns: tuple[int, int, int] = (0, 1, 2),
                     tail_bytes: int = TAIL_BYTES) -> tuple[EndedCall, ...]:
    """The calls in the last ``tail_bytes`` of a PBX CDR file (a missing or unreadable file:
    logged, nothing). Lines that make no sense are logged with their place and skipped."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, io.SEEK_END)
            start = max(0, size - tail_bytes)
            handle.seek(start)
            data = handle.read(size - start)
    except FileNotFoundError:  # the PBX writes it with its first CDR
        log.info("PBX CDR file %s: not there (yet)", where)
        return ()
    except OSError as exc:
        log.error("PBX CDR file %s: %s; calls that ended while the agent did not watch are billed from what the "
                  "balance store knows", where, exc.strerror or exc)
        return ()
    if start:  # the first line is cut: skip it
        cut = data.find(b"\n")
        data = data[cut + 1:] if cut >= 0 else b""
    scan = parse_cdr_lines(data, where if not start else f"{where} (last {tail_bytes} bytes)", columns=columns)
    for problem in scan.problems:
        log.warning("PBX CDR file: %s (line skipped)", problem)
    if scan.bad_lines > len(scan.problems):
        log.warning("PBX CDR file %s: %d more lines skipped", where, scan.bad_lines - len(scan.problems))
    return tuple(scan.calls.values())


# A PBX writes a call's CDR line just after its channel is gone (Asterisk's CDR engine runs the
# backends from a task processor; FreeSWITCH's mod_cdr_csv at the session's destruction): a
# call that ended a moment before a resync's listing can lack its line in the first read. The
# adapters read the file again this long after the resync (``PbxCdrReread``).
CDR_REREAD_DELAY_S = 2.0


def reread_later(pool: gevent.pool.Group, pbx: str, path: str, columns: tuple[int, int, int],
                 now_ms: Callable[[], int], deliver: Callable[[PbxCdrReread], None],
                 delay_s: float = CDR_REREAD_DELAY_S) -> None:
    """Read ``path`` again in ``delay_s`` (a greenlet of ``pool``, which the adapter kills when
    it stops) and hand the engine what it says."""

    def reread() -> None:
        gevent.sleep(delay_s)
        deliver(PbxCdrReread(pbx, now_ms(), read_ended_calls(path, columns=columns)))

    def failed(greenlet: gevent.Greenlet[[], None]) -> None:
        log.error("PBX CDR file %s: the second read after a resync failed: %r; calls that waited for it are "
                  "billed at the next resync", path, greenlet.exception)

    pool.spawn(reread).link_exception(failed)
