"""Every carrier's buy deck in one index (DESIGN §10, issue 17): one probe per prefix length finds
each carrier's longest match, and the route selection runs on the packed records.

Pure (no I/O, no clock). The route book (``agent/adapters/sql/route_book.py``) streams a deck's
rows into a :class:`~agent.core.ratetable.RateTableBuilder` (the sell decks' checks, windows and
precedence), then :meth:`BuyIndex.with_decks` makes a *new* index beside the current one and the
book swaps the reference: the index a call holds never changes under it.

Why one index: ten :class:`~agent.core.ratetable.RateTable` of a million prefixes each are ten
dicts of a million entries, ~170 bytes a prefix (1,976 MB for 11 decks, bench/bench_routing.py),
and ten look-ups a call. Here:

* ``slots``: one dict for all decks, prefix (as ``int("1" + prefix)``, as RateTable keys it) ->
  slot number. It only grows: a key added for a new deck is invisible to older index versions,
  whose decks have nothing at that slot, so it can be shared by every version without a copy.
  (A prefix that every deck dropped keeps its slot until the daemon restarts.)
* per deck, one ``bytearray`` of 44 bytes a slot: a flag byte (0: no row, 1: the row follows,
  3: the row follows and applies at every instant (no effective dates, no time window: the
  selection takes it without a check), 2: several rows, in ``several[slot]``, most specific
  first) and RateTable's own record (its packing, precedence and window check) with its five
  *shape* fields (connect fee, first increment, increment, minimum, grace: 24 bytes) replaced
  by the shape's position in ``shapes``. A deck reloaded is one new array (44 MB for a million
  slots); the other decks' arrays are shared.
* ``shapes``: every distinct shape of every deck, once (real decks have a handful). Like
  ``slots`` it only grows and is shared by every version. The revenue-assurance rule is worked
  out per pair of shapes (:class:`~agent.core.routing.LossVerdicts`), so the selection keys it
  by this int, not by a tuple sliced and hashed per carrier; and a slot is 20 bytes smaller
  (200 MB less for ten decks of a million prefixes).
* per deck, its :class:`RateTable` without prefixes ("hollow"): its settings, destinations and
  windows; it also words the refusals (no rate, a bad number) exactly as a deck's own table does.
* RateTable's six-digit length filter over ``slots`` says which prefix lengths can match.

The answers are the per-deck RateTable look-ups' (longest applicable prefix at the instant, time
windows in the deck's zone, several rows by precedence, a blocked winner refused): tested equal
on random decks and numbers by hypothesis (tests/test_routing.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from agent.core.events import DenyReason
from agent.core.ratetable import (
    _GROUPS,
    _NO_ID,
    _POWERS,
    _RECORD,
    FILTER_MIN_PREFIXES,
    GROUP_DIGITS,
    MAX_NUMBER_DIGITS,
    RateTable,
    RateTableBuilder,
    Refusal,
    _LengthFilter,
    _new_row,
    normalise_number,
)
from agent.core.rating import OPEN_END_MS, RateRow
from agent.core.routing import (
    _LCR_ORDER,
    COMPARE_SECONDS,
    CallRoutes,
    CarrierState,
    LossVerdicts,
    Route,
    RouteChoice,
    RoutePolicy,
    Skipped,
    SkipReason,
    _cost,
    order_routes,
)

# The flag byte, then RateTable's record (``_RECORD``: destination, rate, the five shape fields,
# effective from, to, window, blocked, rate id) with the shape fields replaced by the shape's
# position in the index's ``shapes``. Fields once unpacked: 0 flag, 1 destination, 2 rate,
# 3 shape, 4 effective from, 5 effective to, 6 window, 7 blocked, 8 rate id.
_SLOT = struct.Struct("<BIqIqqH?q")
_SIZE = _SLOT.size
_SHAPE_AT = struct.calcsize("<Iq")  # the shape fields' bytes in a RateTable record: [_SHAPE_AT:_SHAPE_END]
_SHAPE_END = struct.calcsize("<IqqIIII")
_SHAPE = struct.Struct("<qIIII")  # connect fee, first increment, increment, minimum, grace
_SHAPE_ID = struct.Struct("<I")
assert _SLOT.format.lstrip("<") == "B" + _RECORD.format[1:3] + "I" + _RECORD.format[8:]
_unpack_from: Callable[[bytearray, int], tuple[Any, ...]] = _SLOT.unpack_from
_ONE, _SEVERAL, _PLAIN = 1, 2, 3  # _PLAIN: one row, open-ended, no time window (most rows)
# A record is _PLAIN when its start, end and window (fields 7-9 of RateTable's record) are these
# bytes: effective from 0 to OPEN_END_MS, window 0 (every day, all day), so it applies at any
# instant in [0, OPEN_END_MS). Compared as bytes: the load does not unpack ten million records.
_PLAIN_AT = struct.calcsize("<" + _RECORD.format.lstrip("<")[:7])
_PLAIN_TAIL = struct.pack("<qqH", 0, OPEN_END_MS, 0)
_PLAIN_END = _PLAIN_AT + len(_PLAIN_TAIL)
_PAUSE_MASK = 0xFFFF  # a pause every 65,536 rows merged (the daemon yields to live calls)
_LOADING = "buy deck still loading"
_NO_OFFSET = 1 << 62  # select_offers: the number has no slot (unpack_from raises struct.error there)
_NO_FIELDS = (0,)  # no record: its flag is never _PLAIN
_NO_LIVE: Mapping[str, int] = {}


class Shapes:
    """The row shapes of an index and every later version of it: append-only (module docstring)."""

    __slots__ = ("ids", "shapes")

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []  # position -> (fee, first, increment, minimum, grace)
        self.ids: dict[bytes, bytes] = {}  # the shape's bytes in a RateTable record -> its position, packed

    def packed_id(self, shape: bytes) -> bytes:
        """The position of a shape (its bytes in a RateTable record), packed for a slot; a new
        shape is added."""
        packed = self.ids.get(shape)
        if packed is None:
            packed = self.ids[shape] = _SHAPE_ID.pack(len(self.shapes))
            self.shapes.append(_SHAPE.unpack(shape))
        return packed

    def slot_record(self, flag: int, record: bytes) -> bytes:
        """A slot's bytes (flag and fields) of a RateTable record."""
        return bytes((flag,)) + record[:_SHAPE_AT] + self.packed_id(record[_SHAPE_AT:_SHAPE_END]) + record[_SHAPE_END:]


@dataclass(frozen=True, slots=True, eq=False)
class BuyDeck:
    """One carrier's deck inside a :class:`BuyIndex`."""

    table: RateTable  # hollow: settings, destinations, windows; refusals are worded by it
    records: bytearray  # _SIZE bytes a slot of the index's shared ``slots``
    several: dict[int, tuple[bytes, ...]]  # slot -> its rows in _SLOT format, most specific first
    destinations: tuple[str, ...]
    weekdays: tuple[str, ...]
    windows: tuple[tuple[int, int, int], ...]
    lengths: frozenset[int]
    prefix_count: int
    shapes: list[tuple[int, ...]]  # the index's (shared, only grows): a record's field 3 is a position in it

    @property
    def plan_name(self) -> str:
        return self.table.plan_name

    @property
    def version(self) -> int:
        return self.table.version

    def row(self, fields: tuple[Any, ...], digits: str, length: int) -> RateRow:
        """The RateRow of an unpacked slot record, as RateTable.lookup builds it."""
        _, dest, rate, shape, start_ms, end_ms, window, blocked, rate_id = fields
        fee, first, increment, minimum, grace = self.shapes[shape]
        _, time_from, time_to = self.windows[window]
        row: RateRow = _new_row(RateRow, (
            digits[:length], self.destinations[dest], rate, fee, first, increment, minimum, grace, start_ms,
            end_ms, self.weekdays[window], time_from, time_to, blocked, None if rate_id == _NO_ID else rate_id))
        return row

    def applies(self, fields: tuple[Any, ...], at_ms: int) -> bool:
        window = fields[6]
        return bool(fields[4] <= at_ms < fields[5]
                    and (not window or self.table._in_window(window, at_ms)))  # 0: every day, all day


class BuyIndex:
    """All buy decks, immutable once built (module docstring); ``BuyIndex()`` is the empty one."""

    def __init__(self, slots: dict[int, int] | None = None, decks: Mapping[str, BuyDeck] | None = None,
                 length_filter: _LengthFilter | None = None, shapes: Shapes | None = None) -> None:
        self._slots: dict[int, int] = {} if slots is None else slots
        self._shapes = Shapes() if shapes is None else shapes
        self._decks: dict[str, BuyDeck] = dict(decks or {})
        self._filter = length_filter
        lengths = sorted(set().union(*(d.lengths for d in self._decks.values())), reverse=True)
        self._probes = [tuple((k, _POWERS[n - k]) for k in lengths if k <= n) for n in range(MAX_NUMBER_DIGITS + 1)]
        if length_filter is not None:
            self._long, self._short, self._memo = length_filter.long, length_filter.short, length_filter.memo

    @property
    def decks(self) -> Mapping[str, BuyDeck]:
        return self._decks

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def deck(self, plan_name: str) -> BuyDeck | None:
        return self._decks.get(plan_name)

    def with_decks(self, builders: Iterable[RateTableBuilder], *, pause: Callable[[], None] | None = None,
                   length_filter: bool | None = None) -> BuyIndex:
        """A new index: this one's decks plus (or instead of, by plan name) the builders' decks.

        Each builder is built (RateTable's precedence order), copied into its deck's array and
        emptied, one at a time, so a load holds one deck's rows twice at most. ``pause`` runs
        every 65,536 rows. ``length_filter``: as :meth:`RateTableBuilder.build` (default: for
        ``FILTER_MIN_PREFIXES`` prefixes or more).
        """
        slots = self._slots
        decks = dict(self._decks)
        known = len(slots)
        for builder in builders:
            deck = _deck(builder, slots, self._shapes, pause)
            decks[deck.plan_name] = deck
        wanted = length_filter if length_filter is not None else len(slots) >= FILTER_MIN_PREFIXES
        found = self._filter if len(slots) == known else None  # no new prefix: the filter still holds
        if wanted and found is None:
            found = _LengthFilter(cast(dict[int, Any], slots))
        return BuyIndex(slots, decks, found if wanted else None, self._shapes)

    def lookup(self, plan_name: str, number: str, at_ms: int) -> RateRow | Refusal:
        """What the deck's own ``RateTable.lookup`` answers (tests, one-off quotes)."""
        deck = self._decks[plan_name]
        digits = normalise_number(number, deck.table.international_prefix)
        if isinstance(digits, Refusal):
            return deck.table.lookup(number, at_ms)  # worded by the deck's (hollow) table
        fields, length = self._find(digits, at_ms, deck, deck.records)
        if fields is None:
            return deck.table.lookup(number, at_ms)
        row = deck.row(fields, digits, length)
        return RateTable._blocked(number, row) if row.blocked else row

    def _probes_of(self, digits: str) -> tuple[int, Sequence[tuple[int, int]]]:
        """The number's key and the (prefix length, divisor) pairs worth probing, longest first:
        RateTable.lookup's, with the length filter when the index has one."""
        key = int("1" + digits)
        n = len(digits)
        if self._filter is None or n < GROUP_DIGITS:
            return key, self._probes[n]
        group = key // _POWERS[n - GROUP_DIGITS] - _GROUPS  # RateTable's _LengthFilter.probes, inlined
        return key, (self._memo.get((self._long[group] | self._short[group // 10]) << 7 | n)
                     or self._filter.probes(key, n))

    def _find(self, digits: str, at_ms: int, deck: BuyDeck, records: bytearray) -> tuple[tuple[Any, ...] | None, int]:
        """The unpacked record of ``deck``'s row for ``digits`` at ``at_ms`` and its prefix length
        ((None, 0): no row): the longest prefix whose row applies at that instant (effective
        dates, time window), several rows by RateTable's precedence. ``records`` is
        ``deck.records``."""
        key, probes = self._probes_of(digits)
        slots = self._slots
        for length, divisor in probes:
            slot = slots.get(key // divisor)
            if slot is None:
                continue
            offset = slot * _SIZE
            flag = records[offset] if offset < len(records) else 0  # shorter: a prefix added after this deck
            if flag in (_PLAIN, _ONE):
                fields = _unpack_from(records, offset)
                if deck.applies(fields, at_ms):
                    return fields, length
            elif flag == _SEVERAL:
                for fields in map(_SLOT.unpack, deck.several[slot]):
                    if deck.applies(fields, at_ms):
                        return fields, length  # the most specific (RateTable's precedence)
            # nothing here at that instant: a shorter prefix may have a row
        return None, 0


def _deck(builder: RateTableBuilder, slots: dict[int, int], shapes: Shapes,
          pause: Callable[[], None] | None) -> BuyDeck:
    table = builder.build(length_filter=False)  # sorts a prefix's several rows by precedence
    index = builder.index  # the table's own dict: emptied below, the table keeps its settings
    new = [key for key in index if key not in slots]  # new prefixes, in the deck's order: the next slots
    slots.update(zip(new, range(len(slots), len(slots) + len(new)), strict=True))
    records = bytearray(len(slots) * _SIZE)
    several: dict[int, tuple[bytes, ...]] = {}
    packed_id = shapes.packed_id
    with memoryview(records) as view:  # a memoryview's slice assignment is twice as fast as bytearray's
        for done, (key, entry) in enumerate(index.items(), 1):
            offset = slots[key] * _SIZE
            if isinstance(entry, bytes):  # Shapes.slot_record, inlined (ten million rows)
                view[offset] = _PLAIN if entry[_PLAIN_AT:_PLAIN_END] == _PLAIN_TAIL else _ONE
                view[offset + 1:offset + _SIZE] = (entry[:_SHAPE_AT] + packed_id(entry[_SHAPE_AT:_SHAPE_END])
                                                   + entry[_SHAPE_END:])
            else:
                view[offset] = _SEVERAL
                several[slots[key]] = tuple(shapes.slot_record(_ONE, record) for record in entry)
            if not done & _PAUSE_MASK and pause is not None:
                pause()
    prefix_count = len(index)
    index.clear()
    return BuyDeck(table, records, several, tuple(builder.destinations), tuple(builder.weekday_texts),
                   tuple(builder.windows), frozenset(builder.lengths), prefix_count, shapes.shapes)


# ------------------------------------------------------------------------------- selection

# A carrier as the selection reads it: name, trunk, priority, weight, enabled, max channels, why it
# has no buy rate whatever the number (None: it has a deck), the deck's position in
# ``Offers.decks``, the deck's records and the position of its international prefix in
# ``Offers.intls`` (-1 and an empty array without a deck).
_Candidate = tuple[str, str, int, int, bool, int | None, str | None, int, bytearray, int]


@dataclass(frozen=True, slots=True)
class Offers:
    """The carriers of a call as :func:`select_offers` reads them, prepared once per carriers list,
    index and sell currency (:func:`prepare_offers`)."""

    candidates: tuple[_Candidate, ...]
    decks: tuple[BuyDeck, ...]
    intls: tuple[str, ...]  # the decks' international prefixes, each once (a number is read once per prefix)
    loading: tuple[str, ...]  # decks not in the index yet (the book loads them in the background)
    index: BuyIndex  # the index the decks are in (a live call's IndexedRoutes finds its rows there again)
    # carrier name -> its position in ``candidates``; None when names repeat or there are more
    # than 255 (the calls then keep FlatRoutes)
    positions: dict[str, int] | None


def prepare_offers(index: BuyIndex, carriers: Iterable[tuple[CarrierState, str | None, str | None]]) -> Offers:
    """``carriers``: each carrier's state (its live channels are the call's), the plan name of
    its buy deck, and why it has none for this call (no deck, another currency), else None.
    A deck not in ``index`` leaves its carrier out as still loading."""
    candidates: list[_Candidate] = []
    decks: list[BuyDeck] = []
    intls: list[str] = []
    loading: list[str] = []
    for state, plan, why in carriers:
        position, note, records, group = -1, why, bytearray(), -1
        if state.enabled and note is None:
            deck = index.deck(plan) if plan is not None else None
            if deck is None:
                note = _LOADING if plan is not None else "no buy deck imported"
                if plan is not None:
                    loading.append(plan)
            else:
                position, records = len(decks), deck.records
                decks.append(deck)
                intl = deck.table.international_prefix
                if intl not in intls:
                    intls.append(intl)
                group = intls.index(intl)
        candidates.append((state.name, state.trunk, state.priority, state.weight, state.enabled,
                           state.max_channels, note, position, records, group))
    positions = {candidate[0]: n for n, candidate in enumerate(candidates)}
    unique = len(positions) == len(candidates) and len(candidates) <= 255  # one byte per route
    return Offers(tuple(candidates), tuple(decks), tuple(intls), tuple(loading), index, positions if unique else None)


class IndexedChoice(RouteChoice):
    """A :class:`RouteChoice` made by :func:`select_offers`: the call keeps :class:`IndexedRoutes`."""

    __slots__ = ("_at_ms", "_number", "_offers")

    def __init__(self, routes: tuple[Route, ...], skipped: tuple[Skipped, ...], policy: RoutePolicy, *,
                 later: Callable[[], tuple[Skipped, ...]] | None, offers: Offers, number: str, at_ms: int) -> None:
        super().__init__(routes, skipped, policy, later=later)
        self._offers, self._number, self._at_ms = offers, number, at_ms

    def call_routes(self, sell: RateRow, level: int = 0) -> CallRoutes:
        positions = self._offers.positions
        if positions is None:
            return super().call_routes(sell, level)
        order = bytes([positions[route.carrier] for route in self.routes])
        return IndexedRoutes(self._offers, self._number, self._at_ms, order, sell, level)


class IndexedRoutes(CallRoutes):
    """A routed call's routes as the positions of its carriers in the :class:`Offers` they were
    chosen from (one byte each), with the number and instant they were chosen for: a live call
    holds one object and six references for the garbage collector to walk, where the flat
    tuple of ten routes held 200 values, walked three times at the call's first young
    collection (bench_asterisk --carriers 10: young collections took 0.215 ms on average
    against 0.086 without routing; 0.092 now). A route is rebuilt when read (at the answer and at the
    settle: one or two look-ups in the index, which never changes under the call); the offers
    keep their index version alive while such a call lasts."""

    __slots__ = ("_at_ms", "_number", "_offers", "_order")

    def __init__(self, offers: Offers, number: str, at_ms: int, order: bytes, sell: RateRow, level: int = 0) -> None:
        super().__init__(sell, level)
        self._offers, self._number, self._at_ms, self._order = offers, number, at_ms, order

    @property
    def trunks(self) -> tuple[str, ...]:
        candidates = self._offers.candidates
        return tuple(candidates[position][1] for position in self._order)

    @property
    def carriers(self) -> tuple[str, ...]:
        candidates = self._offers.candidates
        return tuple(candidates[position][0] for position in self._order)

    @property
    def first_carrier(self) -> str:
        return self._offers.candidates[self._order[0]][0] if self._order else ""

    def _route(self, n: int) -> Route:
        """The route as select_offers made it: the same row found again at the same instant."""
        name, trunk, priority, weight, _, _, _, i, records, group = self._offers.candidates[self._order[n]]
        deck = self._offers.decks[i]
        digits = normalise_number(self._number, self._offers.intls[group])
        assert isinstance(digits, str)  # it was routed: the number was read
        fields, length = self._offers.index._find(digits, self._at_ms, deck, records)
        assert fields is not None
        row = deck.row(fields, digits, length)
        return Route(name, trunk, row, _cost(row, COMPARE_SECONDS), priority, weight)


_LCR = RoutePolicy.LCR
_new_route = tuple.__new__  # skips Route's Python-level __new__ on the hot path
_DISABLED, _AT_LIMIT, _NO_RATE, _BLOCKED, _LOSS = (SkipReason.DISABLED, SkipReason.AT_LIMIT, SkipReason.NO_RATE,
                                                   SkipReason.BLOCKED, SkipReason.LOSS)


def select_offers(sell: RateRow, number: str, at_ms: int, index: BuyIndex, offers: Offers, policy: RoutePolicy, *,
                  live_channels: Mapping[str, int] | None = None, allow_loss: bool = False, seed: int = 0,
                  verdicts: LossVerdicts | None = None) -> RouteChoice:
    """What ``select_routes(sell, [(state, deck's lookup(number, at_ms)) ...], policy, ...)``
    returns (tested equal), without a row object for a carrier that is left out: the loss
    verdict reads the packed record (``verdicts`` keeps the rule's points per pair of row shapes,
    :class:`~agent.core.routing.LossVerdicts`), a carrier dropped by that rule or for a blocked
    row gets its row, amounts and words only if :meth:`RouteChoice.detail` or ``skipped`` is read.

    One pass over the carriers, inlined on purpose (every routed call runs it once per carrier,
    bench/bench_routing.py): the number's longest prefix in the shared index is found once (one
    dict probe per prefix length until a slot exists); a carrier's record there is taken without
    a check when it is ``_PLAIN`` (one row, open-ended, every day: most rows); anything else (no
    row at that slot, effective dates, a time window, several rows) goes through
    :meth:`BuyIndex._find` for that deck alone. A carrier disabled or at its channel limit is not
    looked up at all."""
    # per international prefix (usually one): the number's digits and its longest slot
    heads: list[tuple[str, int, int]] = []
    slots = index._slots
    for intl in offers.intls:
        digits = normalise_number(number, intl)
        if isinstance(digits, Refusal):  # the deck's hollow table words the bad number below
            heads.append(("", _NO_OFFSET, 0))
            continue
        key, probes = index._probes_of(digits)
        for length, divisor in probes:  # the longest prefix with a slot, whichever decks have a row there
            slot = slots.get(key // divisor)
            if slot is not None:
                head = (digits, slot * _SIZE, length)
                break
        else:
            head = (digits, _NO_OFFSET, 0)
        heads.append(head)
    plain = _PLAIN if 0 <= at_ms < OPEN_END_MS else -1  # a _PLAIN row applies at every real instant
    live = live_channels or _NO_LIVE
    verdicts = verdicts or LossVerdicts()
    shapes = index._shapes.shapes
    plans = verdicts.shapes_of(sell, shapes)  # LossVerdicts.for_sell, inlined below, keyed by shape position
    sell_rate = sell.rate_micros
    decks = offers.decks
    routes: list[Route] = []
    # an int: the deck position i of a carrier left out by revenue assurance, or ~i (< 0) of one whose row is blocked
    skipped: list[Skipped | int] = []
    lazy = False
    for name, trunk, priority, weight, enabled, max_channels, note, i, records, group in offers.candidates:
        if not enabled:
            skipped.append(Skipped(name, _DISABLED, "disabled"))
            continue
        if max_channels is not None:
            in_use = live.get(name, 0)
            if in_use >= max_channels:
                skipped.append(Skipped(name, _AT_LIMIT, f"{in_use} of {max_channels} channels in use"))
                continue
        if note is not None:
            skipped.append(Skipped(name, _NO_RATE, note))
            continue
        digits, offset, length = heads[group]
        try:
            fields = _unpack_from(records, offset)
        except struct.error:  # no slot for the number, or a prefix added after this deck was built
            fields = _NO_FIELDS
        if fields[0] != plain:
            found, length = index._find(digits, at_ms, decks[i], records) if digits else (None, 0)
            if found is None:
                refusal = decks[i].table.lookup(number, at_ms)  # a Refusal: the hollow table has no prefix
                assert isinstance(refusal, Refusal)
                skipped.append(Skipped(name, _BLOCKED if refusal.reason is DenyReason.BLOCKED else _NO_RATE,
                                       refusal.detail))
                continue
            fields = found
        if fields[7]:  # blocked: its row and the refusal's words are made only when read
            skipped.append(~i)
            lazy = True
            continue
        rate = fields[2]
        if not allow_loss:
            if rate > sell_rate:  # a dearer rate per minute always loses: the likeliest loss
                skipped.append(i)  # made a Skipped only when read
                lazy = True
                continue
            shape = fields[3]  # the position of (fee, first increment, increment, minimum, grace)
            points = plans.get(shape)
            if points is None:
                points = verdicts.points(sell, plans, shapes[shape], shape)
            loses = False
            for billed, sell_billed, fee, sell_fee in points:  # routing.points_lose, inlined
                if fee - (-(rate * billed) // 60) > sell_fee - (-(sell_rate * sell_billed) // 60):
                    loses = True
                    break
            if loses:
                skipped.append(i)
                lazy = True
                continue
        # BuyDeck.row and routing._cost of a COMPARE_SECONDS call, inlined: the kept carriers' hot path
        _, dest, _, shape, start_ms, end_ms, window, blocked, rate_id = fields
        fee, first, increment, minimum, grace = shapes[shape]
        deck = decks[i]
        _, time_from, time_to = deck.windows[window]
        row = _new_row(RateRow, (digits[:length], deck.destinations[dest], rate, fee, first, increment,
                                 minimum, grace, start_ms, end_ms, deck.weekdays[window], time_from, time_to, blocked,
                                 None if rate_id == _NO_ID else rate_id))
        if COMPARE_SECONDS > grace:
            billed = COMPARE_SECONDS if COMPARE_SECONDS > minimum else minimum
            billed = first if billed <= first else first - (-(billed - first) // increment) * increment
            cost = fee - (-(rate * billed) // 60)
        else:
            cost = 0
        routes.append(_new_route(Route, (name, trunk, row, cost, priority, weight)))
    if len(routes) < 2:
        ordered = tuple(routes)
    elif policy is _LCR:
        ordered = tuple(sorted(routes, key=_LCR_ORDER))
    else:
        ordered = tuple(order_routes(routes, policy, seed=seed))
    if not lazy:
        return IndexedChoice(ordered, cast(tuple[Skipped, ...], tuple(skipped)), policy, later=None, offers=offers,
                             number=number, at_ms=at_ms)

    def later() -> tuple[Skipped, ...]:
        """The Skipped of each carrier left out by revenue assurance or a blocked row, its row found
        again (pure)."""
        by_position = {candidate[7]: candidate for candidate in offers.candidates if candidate[7] >= 0}
        made: list[Skipped] = []
        for item in skipped:
            if isinstance(item, Skipped):
                made.append(item)
                continue
            name, _, _, _, _, _, _, i, records, group = by_position[item if item >= 0 else ~item]
            digits, _, _ = heads[group]
            fields, length = index._find(digits, at_ms, decks[i], records)
            assert fields is not None
            row = decks[i].row(fields, digits, length)
            made.append(Skipped(name, _LOSS, "revenue assurance", 0, sell, row) if item >= 0
                        else Skipped(name, _BLOCKED, RateTable._blocked(number, row).detail))
        return tuple(made)

    return IndexedChoice(ordered, (), policy, later=later, offers=offers, number=number, at_ms=at_ms)
