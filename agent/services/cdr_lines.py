"""The spooled form of a settled call: its three SQL rows as PostgreSQL COPY text lines.

::

    b"cdr6\\t" SETTLED_MS "\\t" N "\\n"             header: the instant the call settled (ms), N decisions
    calls row                       "\\n"            CALL_FIELDS
    call_legs row                   "\\n"  per leg   LEG_FIELDS
    rating_decisions row            "\\n"  N times   RATING_FIELDS: the customer's, then one per
                                                     level above it (DESIGN §11), each under its
                                                     own call id (``level_call_id``)

A row is the fields in the column order of the writer's COPY (agent/adapters/sql/cdr_writer.py:
CALL_COLUMNS, LEG_COLUMNS, DECISION_COLUMNS) separated by tabs, in COPY's text format: ``\\N``
for NULL, instants as ``YYYY-MM-DD HH:MM:SS.mmm`` (UTC, naive), booleans ``t``/``f``, text with
backslash, tab, newline and carriage return escaped, UTF-8. A spool replay into PostgreSQL then
hands the lines to COPY as they are (~1 µs of Python per call instead of ~22 µs for the JSON
form); every other consumer (SQLite, MariaDB, a batch the database refuses) decodes them back
into the same CallRecord (``decode_lines``). The ``cdr6`` tag tells this form from the JSON
form (``{``) of earlier spools, from ``cdr5`` (without the buy side: carrier, buy row, buy
cost, margin), ``cdr4`` (one decision, without its level, tenant, account and customer's
call), ``cdr3`` (nor the rating's currencies, FX rate and plan-currency cost) and
``cdr2`` (nor ``bundle_seconds``), all still read (through the general path).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from agent.core.cdr import CallRecord, Disposition, LegRecord, RatingRecord
from agent.core.session import level_call_id

TAG = b"cdr6\t"
CDR5_TAG = b"cdr5\t"  # N decisions, without the buy side
# spools of earlier versions: cdr5 without the buy side, cdr4 one decision without its level, cdr3
# nor the currencies, cdr2 nor bundle_seconds
TAGS = (TAG, CDR5_TAG, b"cdr4\t", b"cdr3\t", b"cdr2\t")
NULL = "\\N"
CALL_FIELDS = ("call_id", "node", "account_id", "caller", "destination", "started_ms", "answered_ms", "ended_ms",
               "duration_ms", "disposition", "hangup_cause", "pbx", "settled_ms")
LEG_FIELDS = ("pbx_unique_id", "channel", "direction", "sip_call_id", "peer", "caller", "callee", "created_ms",
              "answered_ms", "ended_ms", "hangup_cause", "billsec", "billed")  # after the call id
RATING_FIELDS = ("seq", "plan_name", "rate_id", "prefix", "rate_micros", "billed_seconds", "cost_micros",
                 "decided_ms", "reason", "bundle_seconds", "plan_currency", "currency", "fx_rate_e10", "fx_inverse",
                 "plan_cost_micros", "level", "tenant", "account_id", "of_call_id", "carrier", "buy_rate_id",
                 "buy_prefix", "buy_rate_micros", "buy_billed_seconds", "buy_cost_micros",
                 "margin_micros")  # after the call id
CDR3_RATING_FIELDS = 10  # a cdr3 rating line: up to bundle_seconds
CDR4_RATING_FIELDS = 15  # a cdr4 rating line: up to plan_cost_micros
CDR5_RATING_FIELDS = 19  # a cdr5 rating line: up to of_call_id

EPOCH = datetime(1970, 1, 1)
_UNSAFE = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\", "b": "\b", "f": "\f", "v": "\v"}
_SECONDS: dict[int, str] = {}  # epoch second -> "YYYY-MM-DD HH:MM:SS" (the calls of a minute share them)
_EPOCH_SECONDS: dict[str, int] = {}  # the other way round, for decode_lines


def _ts(ms: int | None) -> str:
    if ms is None:
        return NULL
    seconds, millis = divmod(ms, 1000)
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= 100_000:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = (EPOCH + timedelta(seconds=seconds)).isoformat(" ")
    return f"{prefix}.{millis:03d}"


def _ts_set(ms: int) -> str:
    if ms is None:
        raise TypeError("an instant that must be set is None")
    return _ts(ms)


def _opt(value: int | None) -> str:
    return NULL if value is None else f"{value:d}"


def _bool(value: bool) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected a bool, not {value!r}")
    return value


def _esc(value: str) -> str:
    return value.translate(_ESCAPES)


def encode_lines(record: CallRecord) -> bytes:
    """The spooled form of ``record``. Raises TypeError/ValueError/OverflowError when a field has
    a value this form cannot carry as it is (a None in a text field, an instant out of range):
    the caller then spools the JSON form, which keeps the value for the general path to judge.
    Also AttributeError (a disposition that is not a Disposition)."""
    r = record
    legs = r.legs
    ratings = (r.rating, *r.upper)
    texts = [r.call_id, r.node, r.account_id, r.caller, r.destination, r.disposition.value, r.hangup_cause, r.pbx]
    for leg in legs:
        texts += (leg.pbx_unique_id, leg.channel, leg.direction, leg.sip_call_id, leg.peer, leg.caller, leg.callee,
                  leg.hangup_cause)
    for g in ratings:
        texts += (level_call_id(r.call_id, g.level), g.plan_name, g.prefix, g.reason, g.plan_currency, g.currency,
                  g.tenant, g.account_id, g.carrier, g.buy_prefix)
    if _UNSAFE.search("".join(texts)):  # join: also a TypeError on a value that is not a string
        texts = [_esc(t) for t in texts]
    cid = texts[0]
    settled = r.settled_ms or r.ended_ms or r.started_ms
    parts = [f"cdr6\t{settled:d}\t{len(ratings):d}\n"
             f"{cid}\t{texts[1]}\t{texts[2]}\t{texts[3]}\t{texts[4]}\t{_ts_set(r.started_ms)}\t"
             f"{_ts(r.answered_ms)}\t{_ts(r.ended_ms)}\t{r.duration_ms:d}\t{texts[5]}\t{texts[6]}\t{texts[7]}\t"
             f"{_ts(r.settled_ms)}\n"]
    i = 8
    for leg in legs:
        if type(leg.billed) is not bool:
            raise TypeError(f"billed is {leg.billed!r}")
        parts.append(f"{cid}\t{texts[i]}\t{texts[i + 1]}\t{texts[i + 2]}\t{texts[i + 3]}\t{texts[i + 4]}\t"
                     f"{texts[i + 5]}\t{texts[i + 6]}\t{_ts_set(leg.created_ms)}\t{_ts(leg.answered_ms)}\t"
                     f"{_ts(leg.ended_ms)}\t{texts[i + 7]}\t{leg.billsec:d}\t{'t' if leg.billed else 'f'}\n")
        i += 8
    for g in ratings:
        parts.append(f"{texts[i]}\t{g.seq:d}\t{texts[i + 1]}\t{_opt(g.rate_id)}\t{texts[i + 2]}\t{g.rate_micros:d}\t"
                     f"{g.billed_seconds:d}\t{g.cost_micros:d}\t{_ts_set(g.decided_ms)}\t{texts[i + 3]}\t"
                     f"{g.bundle_seconds:d}\t{texts[i + 4]}\t{texts[i + 5]}\t{_opt(g.fx_rate_e10)}\t"
                     f"{'t' if _bool(g.fx_inverse) else 'f'}\t{_opt(g.plan_cost_micros)}\t{g.level:d}\t"
                     f"{texts[i + 6]}\t{texts[i + 7]}\t{cid if g.level else NULL}\t{texts[i + 8]}\t"
                     f"{_opt(g.buy_rate_id)}\t{texts[i + 9]}\t{g.buy_rate_micros:d}\t{g.buy_billed_seconds:d}\t"
                     f"{_opt(g.buy_cost_micros)}\t{_opt(g.margin_micros)}\n")
        i += 10
    return "".join(parts).encode("utf-8")


def copy_rows(payload: bytes) -> tuple[int, bytes, list[bytes], list[bytes]]:
    """(settled instant in ms, the calls line, the call_legs lines, the rating_decisions lines),
    lines without their newline. For the COPY path: no check beyond the layout; the database
    judges the fields (and a batch it refuses goes to the general path, through decode_lines)."""
    lines = payload.split(b"\n")
    if len(lines) < 4 or lines[-1] or not lines[0].startswith(TAGS):
        raise ValueError("not a spooled call in the cdr6 (or cdr5, cdr4, cdr3, cdr2) form")
    if not lines[0].startswith((TAG, CDR5_TAG)):  # one decision, last
        return int(lines[0][len(TAG):]), lines[1], lines[2:-2], [lines[-2]]
    settled, count = lines[0][len(TAG):].split(b"\t")
    decisions = int(count)
    if decisions < 1 or len(lines) < 3 + decisions:
        raise ValueError(f"a cdr6 call with {decisions} decisions in {len(lines) - 1} lines")
    return int(settled), lines[1], lines[2:-1 - decisions], lines[-1 - decisions:-1]


def _text(field: str) -> str:
    if "\\" not in field:
        return field
    return _UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), field)


def _int(field: str, name: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise ValueError(f"{name} is not an integer: {field!r}") from None


def _opt_int(field: str, name: str) -> int | None:
    return None if field == NULL else _int(field, name)


def _ms(field: str, name: str) -> int | None:
    if field == NULL:
        return None
    seconds = _EPOCH_SECONDS.get(field[:19])
    if seconds is not None and len(field) == 23 and field[19] == "." and field[20:].isdigit():
        return seconds * 1000 + int(field[20:])
    try:
        moment = datetime.fromisoformat(field)
    except ValueError:
        raise ValueError(f"{name} is not an instant: {field!r}") from None
    if moment.tzinfo is not None:
        raise ValueError(f"{name} carries a time zone: {field!r}")
    if len(field) == 23 and field[19] == ".":  # the form encode_lines writes: remember its second
        if len(_EPOCH_SECONDS) >= 100_000:
            _EPOCH_SECONDS.clear()
        _EPOCH_SECONDS[field[:19]] = (moment.replace(microsecond=0) - EPOCH) // timedelta(seconds=1)
    return (moment - EPOCH) // timedelta(milliseconds=1)


def _fields(line: bytes, count: int, what: str) -> list[str]:
    fields = line.decode("utf-8").split("\t")
    if len(fields) != count:
        raise ValueError(f"a {what} line has {len(fields)} fields, not {count}")
    return fields


def decode_lines(payload: bytes) -> CallRecord:
    """Inverse of :func:`encode_lines`. Raises ValueError with the reason on anything else."""
    try:
        _, call, leg_lines, rating_lines = copy_rows(payload)
        c = _fields(call, len(CALL_FIELDS), "calls")
        started_ms = _ms(c[5], "started_ms")
        if started_ms is None:
            raise ValueError("started_ms is NULL")
        legs = []
        for line in leg_lines:
            f = _fields(line, 1 + len(LEG_FIELDS), "call_legs")
            if f[0] != c[0]:
                raise ValueError(f"a leg of call {_text(f[0])!r} in call {_text(c[0])!r}")
            created_ms = _ms(f[8], "created_ms")
            if created_ms is None or f[13] not in ("t", "f"):
                raise ValueError(f"a leg with created_ms {f[8]!r} and billed {f[13]!r}")
            legs.append(LegRecord(pbx_unique_id=_text(f[1]), channel=_text(f[2]), direction=_text(f[3]),
                                  sip_call_id=_text(f[4]), peer=_text(f[5]), caller=_text(f[6]), callee=_text(f[7]),
                                  created_ms=created_ms, answered_ms=_ms(f[9], "answered_ms"),
                                  ended_ms=_ms(f[10], "ended_ms"), hangup_cause=_text(f[11]),
                                  billsec=_int(f[12], "billsec"), billed=f[13] == "t"))
        ratings = [_decode_rating(line, payload, c[0]) for line in rating_lines]
        if ratings[0].level != 0 or any(g.level == 0 for g in ratings[1:]):
            raise ValueError("the customer's decision must come first, and once")
        return CallRecord(call_id=_text(c[0]), node=_text(c[1]), account_id=_text(c[2]), caller=_text(c[3]),
                          destination=_text(c[4]), started_ms=started_ms, answered_ms=_ms(c[6], "answered_ms"),
                          ended_ms=_ms(c[7], "ended_ms"), duration_ms=_int(c[8], "duration_ms"),
                          disposition=Disposition(_text(c[9])), hangup_cause=_text(c[10]), pbx=_text(c[11]),
                          settled_ms=_ms(c[12], "settled_ms"), legs=tuple(legs), rating=ratings[0],
                          upper=tuple(ratings[1:]))
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed call record: not UTF-8 ({exc.reason})") from None
    except ValueError as exc:
        raise ValueError(f"malformed call record: {exc}") from None


def _decode_rating(line: bytes, payload: bytes, cid: str) -> RatingRecord:
    old_form = payload.startswith(b"cdr2\t")
    cdr3 = payload.startswith(b"cdr3\t")
    cdr4 = payload.startswith(b"cdr4\t")
    cdr5 = payload.startswith(CDR5_TAG)
    count = CDR3_RATING_FIELDS if old_form else 1 + CDR3_RATING_FIELDS if cdr3 else \
        1 + CDR4_RATING_FIELDS if cdr4 else 1 + CDR5_RATING_FIELDS if cdr5 else 1 + len(RATING_FIELDS)
    d = _fields(line, count, "rating_decisions")
    if not (old_form or cdr3) and d[14] not in ("t", "f"):
        raise ValueError(f"a rating with fx_inverse {d[14]!r}")
    currencies: dict[str, Any] = {} if old_form or cdr3 else {
        "plan_currency": _text(d[11]), "currency": _text(d[12]), "fx_rate_e10": _opt_int(d[13], "fx_rate_e10"),
        "fx_inverse": d[14] == "t", "plan_cost_micros": _opt_int(d[15], "plan_cost_micros")}
    level = 0
    if not (old_form or cdr3 or cdr4):
        level = _int(d[16], "level")
        currencies.update(level=level, tenant=_text(d[17]), account_id=_text(d[18]))
        if (d[19] != cid) if level else (d[19] != NULL):
            raise ValueError(f"a rating of level {level} of call {_text(d[19])!r} in call {_text(cid)!r}")
    if not (old_form or cdr3 or cdr4 or cdr5):
        currencies.update(carrier=_text(d[20]), buy_rate_id=_opt_int(d[21], "buy_rate_id"), buy_prefix=_text(d[22]),
                          buy_rate_micros=_int(d[23], "buy_rate_micros"),
                          buy_billed_seconds=_int(d[24], "buy_billed_seconds"),
                          buy_cost_micros=_opt_int(d[25], "buy_cost_micros"),
                          margin_micros=_opt_int(d[26], "margin_micros"))
    decided_ms = _ms(d[8], "decided_ms")
    if _text(d[0]) != level_call_id(_text(cid), level) or decided_ms is None:
        raise ValueError(f"a rating of call {_text(d[0])!r} decided at {d[8]!r}")
    return RatingRecord(seq=_int(d[1], "seq"), plan_name=_text(d[2]), rate_id=_opt_int(d[3], "rate_id"),
                        prefix=_text(d[4]), rate_micros=_int(d[5], "rate_micros"),
                        billed_seconds=_int(d[6], "billed_seconds"),
                        cost_micros=_int(d[7], "cost_micros"), decided_ms=decided_ms, reason=_text(d[9]),
                        bundle_seconds=0 if old_form else _int(d[10], "bundle_seconds"),
                        **currencies)
