"""The settled call as one value: what the CDR spool stores and the SQL writer inserts.

A ``CallRecord`` holds the raw facts (``calls`` and ``call_legs`` rows) and the rating decision
(``rating_decisions`` row), kept apart as DESIGN §6 asks. It converts to and from a plain dict of
JSON types (ints, strings, lists) so the spool can store it as one JSON line; instants are epoch
milliseconds and money is integer micro-units, as everywhere in the core.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Disposition(StrEnum):
    ANSWERED = "ANSWERED"
    NO_ANSWER = "NO ANSWER"
    BUSY = "BUSY"
    FAILED = "FAILED"
    DENIED = "DENIED"  # refused by the agent at authorization
    CUT = "CUT"  # answered, then cut by the agent because the money ran out


@dataclass(frozen=True, slots=True)
class LegRecord:
    pbx_unique_id: str
    direction: str  # "inbound" (caller, A) | "outbound" (dialled, B)
    created_ms: int
    channel: str = ""
    sip_call_id: str = ""
    peer: str = ""
    caller: str = ""
    callee: str = ""
    answered_ms: int | None = None
    ended_ms: int | None = None
    hangup_cause: str = ""
    billsec: int = 0
    billed: bool = False  # billing ran from this leg's answer


@dataclass(frozen=True, slots=True)
class RatingRecord:
    decided_ms: int
    plan_name: str = ""
    rate_id: int | None = None
    prefix: str = ""
    rate_micros: int = 0
    billed_seconds: int = 0
    cost_micros: int = 0
    reason: str = "settle"
    seq: int = 1  # 1 = the original rating; re-rating appends 2, 3, ...
    bundle_seconds: int = 0  # of billed_seconds, covered by free-minute bundles (DESIGN §9)
    # Currencies (DESIGN §11): cost_micros is in ``currency`` (the account's), plan_cost_micros
    # in ``plan_currency``; a conversion records the fx_rates row's rate_e10 (``fx_inverse``: the
    # row is currency/plan_currency, used as its exact reciprocal). "" / None: not recorded.
    plan_currency: str = ""
    currency: str = ""
    fx_rate_e10: int | None = None
    fx_inverse: bool = False
    plan_cost_micros: int | None = None
    # Derived charging (DESIGN §11): the level of the chain this decision charges (0: the
    # customer), the tenant whose price it is (the seller: the customer's reseller at level 0,
    # a reseller's parent above) and the account charged ("" at level 0: the call's account).
    level: int = 0
    tenant: str = ""
    account_id: str = ""
    # Wholesale (DESIGN §10), on the decision of the level the operator sells to: the carrier
    # that answered, its buy row, the seconds and cost it bills by its own increments (in the
    # plan's currency: buy decks are compared in it) and the margin (plan_cost_micros - buy cost).
    # "" / None: not routed, or not answered.
    carrier: str = ""
    buy_rate_id: int | None = None
    buy_prefix: str = ""
    buy_rate_micros: int = 0
    buy_billed_seconds: int = 0
    buy_cost_micros: int | None = None
    margin_micros: int | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    call_id: str
    node: str
    pbx: str
    account_id: str
    destination: str
    started_ms: int
    disposition: Disposition
    rating: RatingRecord
    caller: str = ""
    answered_ms: int | None = None
    ended_ms: int | None = None
    duration_ms: int = 0  # billed leg answer to hangup
    hangup_cause: str = ""
    settled_ms: int | None = None
    legs: tuple[LegRecord, ...] = field(default_factory=tuple)
    # The decisions of the levels above the customer (level 1, 2...: each reseller's account
    # charged its parent's price for the same billed time); empty for a direct customer.
    upper: tuple[RatingRecord, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["disposition"] = self.disposition.value
        data["legs"] = [asdict(leg) for leg in self.legs]
        if self.upper:  # absent for a direct customer: the JSON form of earlier versions
            data["upper"] = [asdict(rating) for rating in self.upper]
        else:
            data.pop("upper", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallRecord:
        """Inverse of :meth:`to_dict`. Raises ValueError naming the field on malformed input."""
        try:
            body = dict(data)
            legs = tuple(LegRecord(**leg) for leg in body.pop("legs", []))
            rating = RatingRecord(**body.pop("rating"))
            upper = tuple(RatingRecord(**item) for item in body.pop("upper", []))
            disposition = Disposition(body.pop("disposition"))
            return cls(**body, legs=legs, rating=rating, disposition=disposition, upper=upper)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed call record: {exc}") from None
