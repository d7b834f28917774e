"""Balances and reservations shared by every node: the values and rules of the balance store.

Design overview (DESIGN §5). Money is integer micro-units. For one account::

    available = balance + credit_limit - reserved

* **authorize** (seq 0) checks the status, the concurrent-call limit (live reservations of the
  account on every node) and ``available >= min``; it reserves ``min(want, available)``.
* **nibble** (seq 1, 2, ...) debits the slice just used, taking it out of the call's
  reservation first, and tops the reservation up to the next slice (``reserve``) from what is
  available. A debit larger than the reservation is still charged (the house never loses a
  used second) and the difference is recorded as *overrun*, never dropped.
* **settle** commits the final cost: what the nibbles debited counts toward it, the difference
  is charged or refunded, the rest of the reservation is released. The SQL ledger gets exactly
  one entry of kind ``charge`` with reference ``charge:{call_id}`` (amount ``-cost``, also for a
  cost of zero).
* **release** ends a call that is not to be charged (denied, never answered): the reservation
  goes back. A released call that had nibble debits is charged those debits (see below).
* **expire**: a reservation not renewed within its TTL is released; what its nibbles had
  debited is charged (``charge:{call_id}``) so that a dead node's call still adds up.
  A settle that arrives later charges the rest as an adjustment ``charge-late:{call_id}``.

Every step carries the idempotency key ``(call_id, seq)``: a replayed step returns the stored
outcome and changes nothing. The rules below are pure; the SQL store applies them directly and
the Redis store's Lua scripts implement the same ones (one contract test suite runs on both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.core.bundles import BundleSlot, draw
from agent.core.errors import BillingError, InvalidInput, NotFound
from agent.core.events import DenyReason

__all__ = [
    "MAX_STORE_MICROS",
    "AccountState",
    "AuthorizeOutcome",
    "BundleSettle",
    "bundle_settle_from_json",
    "bundle_settle_to_json",
    "slot_from_json",
    "slot_to_json",
    "CallClose",
    "DenyReason",
    "ExpireReport",
    "LedgerPosting",
    "LiveCall",
    "NibbleOutcome",
    "NibbleRequest",
    "NibbleStatus",
    "ReleaseOutcome",
    "ReleaseStatus",
    "SettleOutcome",
    "SettleStatus",
    "StoreUnavailable",
    "UnknownCall",
    "authorize_decision",
    "authorize_with_bundles",
    "nibble_bundle_draw",
    "check_authorize",
    "check_bundle_request",
    "check_call_id",
    "check_micros",
    "check_nibble",
    "check_ttl",
    "ledger_postings",
    "CLOSE_CHARGE_DESCRIPTION",
    "SETTLE_CHARGE_DESCRIPTION",
    "charge_reference",
    "is_settle_entry",
    "late_charge_reference",
    "nibble_step",
]

# Redis' Lua numbers are doubles: integers are exact below 2**53 (9e9 currency units). The
# store refuses larger amounts rather than round one.
MAX_STORE_MICROS = 2**53 - 1
CALL_ID_MAX_LEN = 64


class StoreUnavailable(BillingError):
    """The balance store (Redis or the SQL database) did not answer in time or refused the
    connection. Nothing was changed by this attempt, or the attempt may be replayed safely."""


class UnknownCall(NotFound):
    """A settle for a call the store does not know, without the account to charge it to."""


# ---------------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class StoreAuthorization:
    """The engine-facing answer to an authorization: ``granted_micros`` reserved for the first
    slice; ``available_micros`` is what the account could spend before this grant (it sizes the
    limit handed to the PBX)."""

    allowed: bool
    granted_micros: int = 0
    available_micros: int = 0
    reason: DenyReason | None = None
    detail: str = ""
    bundle_granted_s: int = 0  # bundle seconds held for the first slice (DESIGN §9)
    bundle_available_s: int = 0  # bundle seconds the call could draw on before this grant


@dataclass(frozen=True, slots=True)
class StoreNibble:
    """The engine-facing answer to one nibble: reserved ``granted_micros`` for the next slice
    after debiting ``debited_micros``; ``ok`` False means no new money (fail closed)."""

    granted_micros: int
    debited_micros: int
    ok: bool = True
    why: str = ""  # when not ok: what the store said (store_unavailable, expired, unknown_call...)
    bundle_granted_s: int = 0  # bundle seconds added to the call's hold for the next slice


@dataclass(frozen=True, slots=True)
class AuthorizeOutcome:
    call_id: str
    allowed: bool
    reason: DenyReason | None
    granted_micros: int  # reserved for the first slice (0 when denied)
    available_micros: int  # available before this grant: the service's max-duration budget
    plan: str = ""
    currency: str = ""
    replayed: bool = False  # the call was already authorized: stored outcome, nothing changed
    bundle_granted_s: int = 0  # bundle seconds held for the first slice
    bundle_available_s: int = 0  # bundle seconds left in the call's periods before this grant


class NibbleStatus(StrEnum):
    GRANTED = "granted"  # applied; granted_micros may be partial (that is all that is left) or 0
    REPLAYED = "replayed"  # this (call_id, seq) was applied before: stored outcome, no change
    STALE = "stale"  # an older seq than the last applied one: nothing changed, no grant
    EXPIRED = "expired"  # not renewed within its TTL: no grant (settle still charges the call)
    CLOSED = "closed"  # the call was settled, released or swept: no grant
    UNKNOWN_CALL = "unknown_call"  # no such reservation (never authorized, or the cache lost it)
    STORE_UNAVAILABLE = "store_unavailable"  # (failure policy) no answer: no grant
    OFFLINE = "offline"  # (fail_open) granted from the offline credit while the store is down


@dataclass(frozen=True, slots=True)
class AuthorizeStep:
    """One call's authorize (seq 0), for ``authorize_many``: a reseller's customer and the levels
    above it (DESIGN §11), each its own call id on its own account, in one round trip. Bundle
    periods are the customer's only (the levels draw money)."""

    account_id: str
    call_id: str
    node: str
    want_micros: int
    min_micros: int
    now_ms: int
    ttl_ms: int
    bundle_slots: tuple[BundleSlot, ...] = ()
    bundle_want_s: int = 0


@dataclass(frozen=True, slots=True)
class NibbleRequest:
    call_id: str
    seq: int
    debit_micros: int
    reserve_micros: int
    now_ms: int
    ttl_ms: int
    account_id: str | None = None  # optional hint; the store knows the call's account
    bundle_used_s: int = 0  # bundle seconds the call has used up to this nibble's boundary
    bundle_want_s: int = 0  # bundle seconds wanted for the next slice (0: the call draws no more)


@dataclass(frozen=True, slots=True)
class NibbleOutcome:
    call_id: str
    seq: int
    status: NibbleStatus
    granted_micros: int  # held for the next slice
    debited_micros: int  # taken by this step (the slice just used); 0 when nothing was applied
    total_debited_micros: int = 0  # taken by every nibble of the call so far
    overrun_micros: int = 0  # total debited beyond what the call held (recorded, never dropped)
    bundle_granted_s: int = 0  # bundle seconds this step added to the call's hold
    bundle_held_s: int = 0  # bundle seconds the call holds after this step (used + next slice)

    @property
    def applied(self) -> bool:
        """The store holds this step's debit (now or from an earlier identical request)."""
        return self.status in (NibbleStatus.GRANTED, NibbleStatus.REPLAYED)


class SettleStatus(StrEnum):
    SETTLED = "settled"  # committed now
    REPLAYED = "replayed"  # already settled at this cost: nothing changed
    AFTER_EXPIRY = "after_expiry"  # the reservation had expired (or was released): rest charged
    WITHOUT_RESERVATION = "without_reservation"  # the store had no reservation: charged in full
    CONFLICT = "conflict"  # already settled at another cost: nothing changed (a caller bug)
    JOURNALED = "journaled"  # (failure policy) the store is down: kept locally, replayed later


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    call_id: str
    account_id: str
    status: SettleStatus
    cost_micros: int  # the cost the store holds for the call
    debited_micros: int = 0  # taken by nibbles before the settle
    released_micros: int = 0  # reservation given back
    overrun_micros: int = 0  # total charged beyond what the call held
    ledger_posted: bool = True  # False: the SQL write failed; the sweeper (expire) retries it
    bundle_used_s: int = 0  # bundle seconds committed for the call


class ReleaseStatus(StrEnum):
    RELEASED = "released"
    REPLAYED = "replayed"
    CLOSED = "closed"  # already settled or expired: nothing changed
    UNKNOWN_CALL = "unknown_call"
    JOURNALED = "journaled"


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    call_id: str
    status: ReleaseStatus
    released_micros: int = 0
    charged_micros: int = 0  # nibble debits of a released call are charged, never given back


@dataclass(frozen=True, slots=True)
class ExpireReport:
    expired: tuple[str, ...] = ()  # calls whose reservation this sweep released
    posted: int = 0  # ledger entries (re)written for closed calls
    pending: int = 0  # closed calls whose ledger entry could not be written yet
    rebuilt: int = 0  # accounts rebuilt from the ledger (or queued) after a Redis master changed


@dataclass(frozen=True, slots=True)
class AccountState:
    """The store's view: ``balance`` is net of what live calls' nibbles already took."""

    account_id: str
    status: str
    balance_micros: int
    reserved_micros: int  # held for live calls' next slices
    credit_limit_micros: int
    max_concurrent_calls: int | None
    live_calls: int
    plan: str = ""
    currency: str = ""
    overrun_micros: int = 0  # total charged beyond what calls held (0 unless a step overran)

    @property
    def available_micros(self) -> int:
        return self.balance_micros + self.credit_limit_micros - self.reserved_micros


@dataclass(frozen=True, slots=True)
class LiveCall:
    account_id: str
    call_id: str
    node: str
    seq: int
    reserved_micros: int
    debited_micros: int
    overrun_micros: int
    created_ms: int
    expires_ms: int
    bundle_held_s: int = 0
    bundle_used_s: int = 0


@dataclass(frozen=True, slots=True)
class BundleSettle:
    """What a settle commits to bundles: the call's ``covered_s`` seconds (``min(b, R)``, DESIGN
    §9) over the periods it may draw on (``slots``, in draw order). The slots travel with the
    settle so that a store that lost the call's holds (a cache restart) still charges the
    right periods."""

    covered_s: int
    slots: tuple[BundleSlot, ...] = ()


def slot_to_json(slot: BundleSlot) -> list[int | None]:
    return [slot.grant_id, slot.period_start_ms, slot.seconds, slot.expires_ms, slot.carry_from_ms]


def slot_from_json(value: Sequence[int | None]) -> BundleSlot:
    grant_id, start, seconds, expires, carry = value
    if grant_id is None or start is None or seconds is None or expires is None:
        raise InvalidInput(f"bundle slot {value!r} lacks a field")
    return BundleSlot(int(grant_id), int(start), int(seconds), int(expires), None if carry is None else int(carry))


def bundle_settle_to_json(bundle: BundleSettle) -> dict[str, object]:
    return {"covered_s": bundle.covered_s, "slots": [slot_to_json(slot) for slot in bundle.slots]}


def bundle_settle_from_json(value: dict[str, Any]) -> BundleSettle:
    return BundleSettle(int(value["covered_s"]), tuple(slot_from_json(slot) for slot in value.get("slots", ())))


# ------------------------------------------------------------------------------------- rules


def check_micros(name: str, value: int) -> None:
    """Refuse a non-integer, negative or too large amount (before anything is stored)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be integer micro-units, not {value!r}")
    if value < 0 or value > MAX_STORE_MICROS:
        raise InvalidInput(f"{name} {value} must be between 0 and {MAX_STORE_MICROS} micro-units")


def check_call_id(call_id: str) -> None:
    if not isinstance(call_id, str) or not call_id or len(call_id) > CALL_ID_MAX_LEN or not call_id.isprintable():
        raise InvalidInput(f"call id {call_id!r} must be 1-{CALL_ID_MAX_LEN} printable characters")


def check_ttl(ttl_ms: int) -> None:
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise InvalidInput(f"reservation TTL {ttl_ms!r} ms must be a positive whole number")


def check_authorize(call_id: str, want_micros: int, min_micros: int, ttl_ms: int) -> None:
    check_call_id(call_id)
    check_micros("want", want_micros)
    check_micros("minimum", min_micros)
    check_ttl(ttl_ms)
    if want_micros < min_micros:
        raise InvalidInput(f"want {want_micros} is less than the minimum {min_micros}")


def check_bundle_request(slots: Sequence[BundleSlot], seconds: int) -> None:
    """Refuse bundle seconds that are not whole and non-negative, or slots of no use."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
        raise InvalidInput(f"bundle seconds {seconds!r} must be a whole number, 0 or more")
    seen: set[tuple[int, int]] = set()
    for slot in slots:
        if slot.seconds < 0 or slot.key in seen:
            raise InvalidInput(f"bundle slot {slot!r} is negative or given twice")
        seen.add(slot.key)


def check_nibble(request: NibbleRequest) -> None:
    check_call_id(request.call_id)
    if isinstance(request.seq, bool) or not isinstance(request.seq, int) or request.seq < 1:
        raise InvalidInput(f"nibble seq {request.seq!r} of call {request.call_id!r} must be 1 or more "
                           "(0 is the authorize)")
    check_micros("debit", request.debit_micros)
    check_micros("reserve", request.reserve_micros)
    check_ttl(request.ttl_ms)
    if request.bundle_used_s < 0 or request.bundle_want_s < 0:
        raise InvalidInput(f"bundle seconds of nibble {request.seq} of call {request.call_id!r} must not be negative")


def authorize_decision(*, status: str, live_calls: int, max_calls: int | None, available_micros: int,
                       want_micros: int, min_micros: int) -> tuple[DenyReason | None, int]:
    """Return ``(deny_reason, granted)``: the reason is None when the call is allowed."""
    reason, granted, _ = authorize_with_bundles(
        status=status, live_calls=live_calls, max_calls=max_calls, available_micros=available_micros,
        want_micros=want_micros, min_micros=min_micros, bundle_lefts=(), bundle_want_s=0)
    return reason, granted


def authorize_with_bundles(*, status: str, live_calls: int, max_calls: int | None, available_micros: int,
                           want_micros: int, min_micros: int, bundle_lefts: Sequence[int],
                           bundle_want_s: int) -> tuple[DenyReason | None, int, list[int]]:
    """Return ``(deny_reason, granted_micros, seconds taken from each bundle period)``.

    Bundles first (DESIGN §9): the first slice's ``bundle_want_s`` billed seconds are taken from
    the periods in order. All of them: the call needs no money yet. Some: the call is allowed
    whatever the money (its first second is covered) and holds up to ``want`` money for the
    rest of the slice. None: money alone decides, as without bundles."""
    if status == "suspended":
        return DenyReason.SUSPENDED, 0, []
    if status != "active":
        return DenyReason.CLOSED, 0, []
    if max_calls is not None and max_calls > 0 and live_calls >= max_calls:
        return DenyReason.MAX_CALLS, 0, []
    taken = draw(bundle_lefts, bundle_want_s) if bundle_want_s > 0 else [0] * len(bundle_lefts)
    got = sum(taken)
    if got > 0:
        return None, (0 if got >= bundle_want_s else min(want_micros, max(available_micros, 0))), taken
    if available_micros < min_micros or available_micros < 0:
        return DenyReason.INSUFFICIENT_FUNDS, 0, taken
    return None, min(want_micros, available_micros), taken


def nibble_bundle_draw(bundle_lefts: Sequence[int], want_s: int, reserve_micros: int) -> tuple[list[int], int]:
    """A nibble's bundle part: the seconds taken from each period for the next slice, and the
    money to reserve for it: none when the bundles gave all that was wanted, else the whole
    ``reserve_micros`` the caller asked (the money of the slice as if no bundle covered it; the
    surplus goes back at the next step)."""
    if want_s <= 0:
        return [0] * len(bundle_lefts), reserve_micros
    taken = draw(bundle_lefts, want_s)
    return taken, (0 if sum(taken) >= want_s else reserve_micros)


@dataclass(frozen=True, slots=True)
class NibbleEffect:
    taken_micros: int  # of the debit, covered by the call's reservation
    overrun_micros: int  # of the debit, beyond the reservation
    granted_micros: int  # the call's reservation after the step (for the next slice)


def nibble_step(*, call_reserved_micros: int, debit_micros: int, reserve_micros: int,
                available_after_debit_micros: int) -> NibbleEffect:
    """One nibble. ``available_after_debit`` is the account's available money once the debit
    is applied, while the call's remaining reservation is still counted as reserved."""
    taken = min(debit_micros, call_reserved_micros)
    remaining = call_reserved_micros - taken
    if remaining >= reserve_micros:
        granted = reserve_micros  # the surplus goes back
    else:
        granted = remaining + min(reserve_micros - remaining, max(available_after_debit_micros, 0))
    return NibbleEffect(taken, debit_micros - taken, granted)


class CallClose(StrEnum):
    """How a call's reservation ended, which decides its ledger entries."""

    SETTLED = "settled"  # settled while its reservation was live (or without one)
    EXPIRED = "expired"  # swept after its TTL
    RELEASED = "released"  # released by the service


# The two ways a call's ``charge:<call>`` entry is written. The description is how the ledger
# tells a settled call (finished: nothing more will come for it) from one whose reservation
# closed first (a late settle may still follow); the Redis rebuild reads it (redis/ledger.py).
SETTLE_CHARGE_DESCRIPTION = "call charge"
CLOSE_CHARGE_DESCRIPTION = "call charge: nibbles debited before the reservation closed"


@dataclass(frozen=True, slots=True)
class LedgerPosting:
    kind: str
    amount_micros: int
    reference: str
    description: str


def charge_reference(call_id: str) -> str:
    """The reference of a call's charge (its settle's, or what its nibbles debited at the close)."""
    return f"charge:{call_id}"


def late_charge_reference(call_id: str) -> str:
    """The reference of the adjustment a settle after the close writes."""
    return f"charge-late:{call_id}"


def is_settle_entry(call_id: str, reference: str, description: str) -> bool:
    """Whether a ledger entry of ``call_id`` was written by its settle (``ledger_postings``): a
    settle's charge, or a late settle's adjustment. Such a call is finished in the ledger."""
    return reference == late_charge_reference(call_id) or (
        reference == charge_reference(call_id) and description == SETTLE_CHARGE_DESCRIPTION)


def ledger_postings(call_id: str, *, closed_charge_micros: int | None, cost_micros: int | None,
                    ) -> list[LedgerPosting]:
    """The ledger entries a closed call must have; their sum is what the store took for it.

    ``closed_charge_micros`` is what nibbles had debited when the reservation expired or was
    released (None if it never did); ``cost_micros`` is the settled cost (None if not settled).
    Posting them is idempotent: the references are unique in the ledger.
    """
    postings: list[LedgerPosting] = []
    charge_ref = charge_reference(call_id)
    if closed_charge_micros is not None and closed_charge_micros > 0:
        postings.append(LedgerPosting("charge", -closed_charge_micros, charge_ref, CLOSE_CHARGE_DESCRIPTION))
        if cost_micros is not None and cost_micros != closed_charge_micros:
            postings.append(LedgerPosting("adjustment", closed_charge_micros - cost_micros,
                                          late_charge_reference(call_id),
                                          "call settled after its reservation closed"))
    elif cost_micros is not None:
        postings.append(LedgerPosting("charge", -cost_micros, charge_ref, SETTLE_CHARGE_DESCRIPTION))
    return postings
