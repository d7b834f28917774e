"""The engine's store (``EngineStore``, agent/ports.py) over a ``BalanceStore`` (Redis or SQL,
normally behind ``StoreGuard``, which owns the deadline and the failure policy)."""

from __future__ import annotations

from agent.core.balance import NibbleRequest, NibbleStatus, StoreAuthorization, StoreNibble, StoreUnavailable
from agent.core.events import DenyReason
from agent.core.session import NibbleStep
from agent.ports import BalanceStore

# Outcomes that applied the step (or had applied it before): the grant is real.
_APPLIED = frozenset({NibbleStatus.GRANTED, NibbleStatus.REPLAYED, NibbleStatus.OFFLINE})


class EngineStoreAdapter:
    """Implements ``EngineStore``. Keeps no state: every step names its account."""

    def __init__(self, store: BalanceStore, *, node: str, ttl_ms: int) -> None:
        self.store = store
        self.node = node
        self.ttl_ms = ttl_ms

    def authorize(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                  now_ms: int) -> StoreAuthorization:
        try:
            outcome = self.store.authorize(account_id, call_id, self.node, want_micros, min_micros, now_ms,
                                           self.ttl_ms)
        except StoreUnavailable as exc:
            return StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE, detail=str(exc))
        if not outcome.allowed:
            return StoreAuthorization(False, reason=outcome.reason, detail=_deny_detail(outcome.reason))
        return StoreAuthorization(True, outcome.granted_micros, outcome.available_micros)

    def nibbles(self, steps: list[NibbleStep], now_ms: int) -> list[StoreNibble]:
        requests = [
            NibbleRequest(step.call_id, step.seq, step.debit_micros, step.reserve_micros, now_ms, self.ttl_ms,
                          account_id=step.account_id or None)
            for step in steps
        ]
        try:
            outcomes = self.store.debit_and_reserve_many(requests)
        except StoreUnavailable:
            return [StoreNibble(0, 0, ok=False) for _ in steps]
        # Anything but an applied step (expired, closed, lost by the cache, unreachable) gets no
        # new money: the engine cuts the call at the end of what it was granted (fail closed).
        return [StoreNibble(o.granted_micros, o.debited_micros, ok=o.status in _APPLIED) for o in outcomes]

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, account_id: str) -> None:
        self.store.settle(call_id, seq, cost_micros, now_ms, account_id=account_id or None)

    def release(self, call_id: str, seq: int, now_ms: int, account_id: str) -> None:
        self.store.release(call_id, seq, now_ms, account_id=account_id or None)


def _deny_detail(reason: DenyReason | None) -> str:
    return {
        DenyReason.UNKNOWN_ACCOUNT: "unknown account",
        DenyReason.SUSPENDED: "account suspended",
        DenyReason.CLOSED: "account closed",
        DenyReason.MAX_CALLS: "too many concurrent calls for this account",
        DenyReason.INSUFFICIENT_FUNDS: "insufficient funds for the first block",
    }.get(reason or DenyReason.INSUFFICIENT_FUNDS, str(reason))
