"""The engine's store (``EngineStore``, agent/ports.py) over a ``BalanceStore`` (Redis or SQL,
normally behind ``StoreGuard``, which owns the deadline and the failure policy)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from agent.core.balance import (
    AuthorizeOutcome,
    AuthorizeStep,
    BundleSettle,
    NibbleRequest,
    NibbleStatus,
    StoreAuthorization,
    StoreNibble,
    StoreUnavailable,
)
from agent.core.bundles import BundleSlot
from agent.core.events import DenyReason
from agent.core.session import NibbleStep
from agent.ports import BalanceStore, StoreRider

log = logging.getLogger(__name__)

# Outcomes that applied the step (or had applied it before): the grant is real.
_APPLIED = frozenset({NibbleStatus.GRANTED, NibbleStatus.REPLAYED, NibbleStatus.OFFLINE})


class EngineStoreAdapter:
    """Implements ``EngineStore``. Keeps no state: every step names its account."""

    def __init__(self, store: BalanceStore, *, node: str, ttl_ms: int) -> None:
        self.store = store
        self.node = node
        self.ttl_ms = ttl_ms

    def authorize(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                  now_ms: int, *, bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                  rider: StoreRider | None = None) -> StoreAuthorization:
        try:
            outcome = self.store.authorize(account_id, call_id, self.node, want_micros, min_micros, now_ms,
                                           self.ttl_ms, bundle_slots=bundle_slots, bundle_want_s=bundle_want_s,
                                           rider=rider)
        except StoreUnavailable as exc:
            return StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE, detail=str(exc))
        return _store_authorization(outcome)

    def authorize_with_levels(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                              levels: Sequence[tuple[str, str, int, int]], now_ms: int, *,
                              bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                              rider: StoreRider | None = None,
                              ) -> tuple[StoreAuthorization, list[StoreAuthorization]]:
        steps = [AuthorizeStep(account_id, call_id, self.node, want_micros, min_micros, now_ms, self.ttl_ms,
                               tuple(bundle_slots), bundle_want_s)]
        steps += [AuthorizeStep(level_account, level_call, self.node, want, minimum, now_ms, self.ttl_ms)
                  for level_call, level_account, want, minimum in levels]
        try:
            outcomes = self.store.authorize_many(steps, rider=rider)
        except StoreUnavailable as exc:
            down = StoreAuthorization(False, reason=DenyReason.STORE_UNAVAILABLE, detail=str(exc))
            return down, [down for _ in levels]
        return _store_authorization(outcomes[0]), [_store_authorization(outcome) for outcome in outcomes[1:]]

    def nibbles(self, steps: list[NibbleStep], now_ms: int) -> list[StoreNibble]:
        requests = [
            NibbleRequest(step.call_id, step.seq, step.debit_micros, step.reserve_micros, now_ms, self.ttl_ms,
                          account_id=step.account_id or None, bundle_used_s=step.bundle_used_s,
                          bundle_want_s=step.bundle_want_s)
            for step in steps
        ]
        try:
            outcomes = self.store.debit_and_reserve_many(requests)
        except StoreUnavailable:
            return [StoreNibble(0, 0, ok=False, why="store_unavailable") for _ in steps]
        # Anything but an applied step (expired, closed, unreachable) gets no new money: the
        # engine cuts the call at the end of what it was granted (fail closed).
        results = [StoreNibble(o.granted_micros, o.debited_micros, ok=o.status in _APPLIED, why=str(o.status),
                               bundle_granted_s=o.bundle_granted_s if o.status in _APPLIED else 0)
                   for o in outcomes]
        for index, (step, outcome) in enumerate(zip(steps, outcomes, strict=True)):
            if outcome.status is NibbleStatus.UNKNOWN_CALL and step.account_id:
                results[index] = self._reserve_again(step, now_ms) or results[index]
        return results

    def _reserve_again(self, step: NibbleStep, now_ms: int) -> StoreNibble | None:
        """The store lost a live call (a Redis that restarted empty, rebuilt from the SQL ledger):
        reserve its next slice again from the account's balance, so a call that still has money
        goes on. The slices debited before are not in the store any more; the settle charges
        the call's whole cost (``without_reservation``), so nothing is lost or charged twice."""
        try:
            again = self.store.authorize(step.account_id, step.call_id, self.node, max(step.reserve_micros, 1), 1,
                                         now_ms, self.ttl_ms)
        except StoreUnavailable:
            return None
        if not again.allowed:
            log.warning("call=%s account=%s: the balance store lost its reservation and refuses a new one (%s)",
                        step.call_id, step.account_id, again.reason)
            return None
        log.warning("call=%s account=%s: the balance store had lost its reservation (restarted empty?); reserved "
                    "again from the account's balance", step.call_id, step.account_id)
        return StoreNibble(min(again.granted_micros, step.reserve_micros), step.debit_micros)

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, account_id: str,
               bundle: BundleSettle | None = None) -> None:
        self.store.settle(call_id, seq, cost_micros, now_ms, account_id=account_id or None, bundle=bundle)

    def release(self, call_id: str, seq: int, now_ms: int, account_id: str) -> None:
        self.store.release(call_id, seq, now_ms, account_id=account_id or None)


def _store_authorization(outcome: AuthorizeOutcome) -> StoreAuthorization:
    if not outcome.allowed:
        return StoreAuthorization(False, reason=outcome.reason, detail=_deny_detail(outcome.reason))
    return StoreAuthorization(True, outcome.granted_micros, outcome.available_micros,
                              bundle_granted_s=outcome.bundle_granted_s, bundle_available_s=outcome.bundle_available_s)


def _deny_detail(reason: DenyReason | None) -> str:
    return {
        DenyReason.UNKNOWN_ACCOUNT: "unknown account",
        DenyReason.SUSPENDED: "account suspended",
        DenyReason.CLOSED: "account closed",
        DenyReason.MAX_CALLS: "too many concurrent calls for this account",
        DenyReason.INSUFFICIENT_FUNDS: "insufficient funds for the first block",
    }.get(reason or DenyReason.INSUFFICIENT_FUNDS, str(reason))
