"""FX rates in SQL (``fx_rates``, DESIGN §11): set, import, list, and the cached conversion the
authorization uses (``FxBook.conversion``; the cache rules are ``cached_lookup.py``'s).

Rates are exact integers (``rate_e10``) and effective-dated; rows are added, never changed: a
rate set again for the same pair and instant is accepted when it is the same rate (a replayed
import) and refused when it differs, so the rate a call was converted at can always be found
again. Correct a rate with a later ``effective_from``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from agent.adapters.sql.cached_lookup import CachedLookup
from agent.adapters.sql.models import FxRateRow, utcnow
from agent.core.clock import parse_iso8601
from agent.core.errors import Conflict, InvalidInput
from agent.core.fx import Conversion, FxRate, check_currency, check_fx_rate, conversion_at, format_rate, parse_rate

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CSV_COLUMNS = ("base", "quote", "rate", "effective_from")
MAX_IMPORT_ERRORS = 100


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _at(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


@dataclass(frozen=True)
class FxRateView:
    base: str
    quote: str
    rate_e10: int
    effective_from: datetime
    created_at: datetime

    @property
    def rate(self) -> str:
        return format_rate(self.rate_e10)


def _store(session: Session, rate: FxRate, where: str) -> bool:
    """Insert ``rate``; False when the same rate is already there for that instant."""
    existing = session.scalar(select(FxRateRow).where(
        FxRateRow.base == rate.base, FxRateRow.quote == rate.quote,
        FxRateRow.effective_from == _at(rate.effective_from_ms)))
    if existing is not None:
        if existing.rate_e10 == rate.rate_e10:
            return False
        raise Conflict(f"{where}: {rate.base}/{rate.quote} from {_at(rate.effective_from_ms).isoformat()} is already "
                       f"{format_rate(existing.rate_e10)}, not {format_rate(rate.rate_e10)} (rates are never "
                       "changed, so that a call's rate can be found again: set the new one from a later instant)")
    session.add(FxRateRow(base=rate.base, quote=rate.quote, rate_e10=rate.rate_e10,
                          effective_from=_at(rate.effective_from_ms), created_at=utcnow()))
    session.flush()
    return True


def set_rate(session: Session, base: str, quote: str, rate: str, effective_from: datetime | None = None) -> FxRateView:
    """``fx set``: one rate from ``effective_from`` (default: now)."""
    moment = effective_from if effective_from is not None else utcnow()
    checked = check_fx_rate(FxRate(check_currency(base, "base currency"), check_currency(quote, "quote currency"),
                                   parse_rate(rate), _ms(moment)), "fx set")
    _store(session, checked, "fx set")
    return FxRateView(checked.base, checked.quote, checked.rate_e10, _at(checked.effective_from_ms), utcnow())


@dataclass(frozen=True)
class ImportResult:
    added: int
    unchanged: int


def parse_csv(text: str, source: str) -> list[FxRate]:
    """Every row of an FX CSV (header ``base,quote,rate,effective_from``), checked; every error
    as ``SOURCE:LINE: column C: reason`` in one :class:`InvalidInput` (at most 100 shown)."""
    errors: list[str] = []
    rates: list[FxRate] = []
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    seen: dict[tuple[str, str, int], int] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise InvalidInput(f"{source}:{line}: the header must name the columns {','.join(CSV_COLUMNS)} "
                                   f"(missing: {', '.join(missing)})")
            continue
        if len(row) != len(header):
            errors.append(f"{source}:{line}: {len(row)} columns, the header has {len(header)}")
            continue
        cells = dict(zip(header, (cell.strip() for cell in row), strict=True))
        values: dict[str, object] = {}
        for column, parse in (("base", lambda v: check_currency(v, "base currency")),
                              ("quote", lambda v: check_currency(v, "quote currency")),
                              ("rate", parse_rate),
                              ("effective_from", lambda v: _ms(parse_iso8601(v, what="effective_from")))):
            try:
                values[column] = parse(cells[column])
            except (InvalidInput, ValueError) as exc:
                errors.append(f"{source}:{line}: column {column}: {exc}")
        if len(values) != len(CSV_COLUMNS):
            continue
        rate = FxRate(str(values["base"]), str(values["quote"]), int(str(values["rate"])),
                      int(str(values["effective_from"])))
        if rate.base == rate.quote:
            errors.append(f"{source}:{line}: column quote: {rate.quote} is the base too (a currency converts to "
                          "itself at 1)")
            continue
        key = (rate.base, rate.quote, rate.effective_from_ms)
        if key in seen:
            errors.append(f"{source}:{line}: {rate.base}/{rate.quote} from {cells['effective_from']} is already on "
                          f"line {seen[key]}")
            continue
        seen[key] = line
        rates.append(rate)
    if header is None:
        raise InvalidInput(f"{source}: empty (the header {','.join(CSV_COLUMNS)} and one rate a line)")
    if errors:
        shown = errors[:MAX_IMPORT_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise InvalidInput("\n".join(shown) + more + f"\n{source}: {len(errors)} errors, nothing imported")
    return rates


def import_csv(session: Session, path: Path, source: str | None = None) -> ImportResult:
    """``fx import``: every row or none (one transaction: the caller's)."""
    where = source or str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rates = parse_csv(text, where)
    added = 0
    for rate in rates:
        added += _store(session, rate, where)
    return ImportResult(added, len(rates) - added)


def list_rates(session: Session, *, base: str | None = None, quote: str | None = None) -> list[FxRateView]:
    query = select(FxRateRow).order_by(FxRateRow.base, FxRateRow.quote, FxRateRow.effective_from)
    if base:
        query = query.where(FxRateRow.base == check_currency(base, "--base"))
    if quote:
        query = query.where(FxRateRow.quote == check_currency(quote, "--quote"))
    return [FxRateView(r.base, r.quote, r.rate_e10, r.effective_from, r.created_at) for r in session.scalars(query)]


def pair_rates(engine: Engine, plan_currency: str, currency: str) -> tuple[tuple[FxRate, ...], tuple[FxRate, ...]]:
    """Every rate of the direct pair ``plan_currency/currency`` and of the inverse pair."""
    with engine.connect() as conn:
        rows = conn.execute(select(FxRateRow.base, FxRateRow.quote, FxRateRow.rate_e10, FxRateRow.effective_from)
                            .where(or_((FxRateRow.base == plan_currency) & (FxRateRow.quote == currency),
                                       (FxRateRow.base == currency) & (FxRateRow.quote == plan_currency)))).all()
    rates = [FxRate(b, q, int(r), _ms(e.replace(tzinfo=UTC) if e.tzinfo is None else e)) for b, q, r, e in rows]
    return (tuple(r for r in rates if r.base == plan_currency), tuple(r for r in rates if r.base == currency))


def conversion_from_sql(engine: Engine, plan_currency: str, currency: str, at_ms: int) -> Conversion | None:
    """The conversion in force at ``at_ms``, read straight from SQL (tools: rates quote, rerate)."""
    direct, inverse = pair_rates(engine, plan_currency, currency)
    return conversion_at(plan_currency, currency, direct, inverse, at_ms)


class FxUnavailable(Exception):
    """The database does not answer and the pair's rates were never read."""


class FxBook:
    """The rates of each currency pair the calls need, cached (see ``cached_lookup.py``):
    ``background`` re-reads a stale pair off the authorization path. A pair's rates are few (one
    row per change), so the whole history of a pair is one entry; the rate in force at the call's
    start is picked from it in memory."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 3_000, retry_ms: int = 2_000, background: bool = False) -> None:
        self.engine = engine
        self.lookup: CachedLookup[tuple[tuple[FxRate, ...], tuple[FxRate, ...]]] = CachedLookup(
            "fx rates", self._load, now_ms, ttl_ms=ttl_ms, negative_ttl_ms=negative_ttl_ms, retry_ms=retry_ms,
            background=background, found=lambda pair: bool(pair[0] or pair[1]),
            unavailable=lambda why: FxUnavailable(f"the database does not answer ({why})"))

    def _load(self, key: str) -> tuple[tuple[FxRate, ...], tuple[FxRate, ...]]:
        plan_currency, currency = key.split("/")
        return pair_rates(self.engine, plan_currency, currency)

    def conversion(self, plan_currency: str, currency: str, at_ms: int) -> Conversion | None:
        try:
            direct, inverse = self.lookup.get(f"{plan_currency}/{currency}")
        except FxUnavailable as exc:
            raise FxUnavailable(f"{exc} and the rates {plan_currency}/{currency} were never read") from None
        return conversion_at(plan_currency, currency, direct, inverse, at_ms)

    @property
    def stale_since_ms(self) -> int | None:
        return self.lookup.stale_since_ms

    def forget(self) -> None:
        self.lookup.forget()

    def close(self) -> None:
        self.lookup.close()
