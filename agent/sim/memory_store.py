"""An in-memory ``EngineStore`` (agent/ports.py) for simulations and tests.

Same rules as the Redis and SQL stores (DESIGN §5): available = balance + credit_limit -
reserved; a nibble debits the slice just used from the call's hold and replaces the hold with
the next slice (partial when the money is short); a settle commits the final cost against what
the nibbles debited and releases the rest; every step is idempotent per (call, seq). It also
records every money movement, so a simulation can check that nothing was overspent or lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.core.balance import (
    BundleSettle,
    StoreAuthorization,
    StoreNibble,
    UnknownCall,
    authorize_with_bundles,
    nibble_bundle_draw,
)
from agent.core.bundles import BundleSlot, commit, rollover_carry
from agent.core.events import DenyReason
from agent.core.session import NibbleStep
from agent.ports import StoreRider


class OverspendError(AssertionError):
    """An account went below -credit_limit: a bug, never a business outcome."""


@dataclass
class MemAccount:
    balance_micros: int
    credit_limit_micros: int = 0
    status: str = "active"
    max_calls: int | None = None
    reserved_micros: int = 0
    calls: set[str] = field(default_factory=set)
    charged_micros: int = 0  # sum of settled costs (the ledger's charges)
    credited_micros: int = 0  # top-ups
    lowest_micros: int = 0  # lowest balance seen
    overspent_micros: int = 0  # money used past the floor by calls the PBX did not cut in time

    @property
    def available_micros(self) -> int:
        return self.balance_micros + self.credit_limit_micros - self.reserved_micros


@dataclass
class MemCall:
    account_id: str
    hold_micros: int
    debited_micros: int = 0
    overrun_micros: int = 0
    seen: dict[int, StoreNibble] = field(default_factory=dict)
    settled: bool = False
    bundle_holds: list[tuple[BundleSlot, int]] = field(default_factory=list)  # draw order
    bundle_used_s: int = 0
    auth_bundle_s: int = 0  # the authorization's bundle answer, given again when it is replayed
    auth_bundle_available_s: int = 0


@dataclass
class MemPeriod:
    """A bundle period (DESIGN §9): ``granted`` is the allowance plus any rollover."""

    granted_s: int
    used_s: int = 0
    reserved_s: int = 0

    @property
    def left_s(self) -> int:
        return self.granted_s - self.used_s - self.reserved_s


class MemoryStore:
    def __init__(self) -> None:
        self.accounts: dict[str, MemAccount] = {}
        self.calls: dict[str, MemCall] = {}
        self.settled: dict[str, int] = {}  # call id -> cost charged (exactly once)
        self.unavailable = False
        self.overspend_micros = 0  # money used beyond what the account had (a PBX that ignored a cut)
        self.overspend_by_call: dict[str, int] = {}
        self.periods: dict[tuple[int, int], MemPeriod] = {}  # (grant id, period start ms)
        self.bundle_used_by_call: dict[str, int] = {}  # call id -> bundle seconds committed

    def _period(self, slot: BundleSlot) -> MemPeriod:
        period = self.periods.get(slot.key)
        if period is None:
            carry = 0
            if slot.carry_from_ms is not None:
                previous = self.periods.get((slot.grant_id, slot.carry_from_ms))
                carry = rollover_carry(allowance_s=slot.seconds,
                                       previous_left_s=slot.seconds if previous is None else previous.left_s)
            period = self.periods[slot.key] = MemPeriod(slot.seconds + carry)
        return period

    def _check_period(self, period: MemPeriod) -> None:
        if period.left_s < 0 or period.reserved_s < 0:
            raise OverspendError(f"bundle period below zero: {period}")

    def add_account(self, account_id: str, balance_micros: int, credit_limit_micros: int = 0,
                    max_calls: int | None = None) -> None:
        self.accounts[account_id] = MemAccount(balance_micros, credit_limit_micros, max_calls=max_calls,
                                               lowest_micros=balance_micros)

    def topup(self, account_id: str, amount_micros: int) -> None:
        account = self.accounts[account_id]
        account.balance_micros += amount_micros
        account.credited_micros += amount_micros

    def _check(self, account: MemAccount) -> None:
        floor = account.balance_micros - account.reserved_micros
        account.lowest_micros = min(account.lowest_micros, account.balance_micros)
        if floor < -account.credit_limit_micros - account.overspent_micros:
            raise OverspendError(f"balance {account.balance_micros} - reserved {account.reserved_micros} "
                                 f"is below -credit_limit {account.credit_limit_micros}")

    def _raise_if_down(self) -> None:
        if self.unavailable:
            raise ConnectionError("memory store marked unavailable")

    # ---------------------------------------------------------------- EngineStore (agent/ports.py)

    def authorize_with_levels(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                              levels: Sequence[tuple[str, str, int, int]], now_ms: int, *,
                              bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                              rider: StoreRider | None = None,
                              ) -> tuple[StoreAuthorization, list[StoreAuthorization]]:
        customer = self.authorize(account_id, call_id, want_micros, min_micros, now_ms, bundle_slots=bundle_slots,
                                  bundle_want_s=bundle_want_s)
        return customer, [self.authorize(level_account, level_call, want, minimum, now_ms)
                          for level_call, level_account, want, minimum in levels]

    def authorize(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                  now_ms: int, *, bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                  rider: StoreRider | None = None) -> StoreAuthorization:
        # ``rider`` is never taken (no round trip here): its owner makes its own (agent/ports.py)
        self._raise_if_down()
        account = self.accounts.get(account_id)
        if account is None:
            return StoreAuthorization(False, reason=DenyReason.UNKNOWN_ACCOUNT, detail=f"unknown account {account_id}")
        if call_id in self.calls:
            call = self.calls[call_id]
            return StoreAuthorization(True, call.hold_micros, account.available_micros + call.hold_micros,
                                      bundle_granted_s=call.auth_bundle_s,
                                      bundle_available_s=call.auth_bundle_available_s)
        if account.status != "active":
            return StoreAuthorization(False, reason=DenyReason.SUSPENDED, detail=f"account is {account.status}")
        if account.max_calls is not None and len(account.calls) >= account.max_calls:
            return StoreAuthorization(False, reason=DenyReason.MAX_CALLS,
                                      detail=f"{len(account.calls)} calls already up")
        available = account.available_micros
        periods = [self._period(slot) for slot in bundle_slots]
        lefts = [period.left_s for period in periods]
        reason, grant, taken = authorize_with_bundles(
            status="active", live_calls=0, max_calls=None, available_micros=available, want_micros=want_micros,
            min_micros=max(min_micros, 1), bundle_lefts=lefts, bundle_want_s=bundle_want_s)
        if reason is not None:
            return StoreAuthorization(False, reason=DenyReason.INSUFFICIENT_FUNDS,
                                      detail=f"available {available} < first block {min_micros}")
        for period, seconds in zip(periods, taken, strict=True):
            period.reserved_s += seconds
            self._check_period(period)
        account.reserved_micros += grant
        account.calls.add(call_id)
        bundle_available = sum(max(left, 0) for left in lefts)
        self.calls[call_id] = MemCall(account_id, grant, bundle_holds=list(zip(bundle_slots, taken, strict=True)),
                                      auth_bundle_s=sum(taken), auth_bundle_available_s=bundle_available)
        self._check(account)
        return StoreAuthorization(True, grant, available, bundle_granted_s=sum(taken),
                                  bundle_available_s=bundle_available)

    def nibbles(self, steps: list[NibbleStep], now_ms: int) -> list[StoreNibble]:
        self._raise_if_down()
        return [self._nibble(step) for step in steps]

    def _nibble(self, step: NibbleStep) -> StoreNibble:
        call = self.calls.get(step.call_id)
        if call is None or call.settled:
            return StoreNibble(0, 0, ok=False)
        if step.seq in call.seen:
            return call.seen[step.seq]
        account = self.accounts[call.account_id]
        # Debit the slice just used out of the hold; a debit beyond the hold is still taken.
        from_hold = min(step.debit_micros, call.hold_micros)
        call.overrun_micros += step.debit_micros - from_hold
        account.balance_micros -= step.debit_micros
        account.reserved_micros -= call.hold_micros
        call.debited_micros += step.debit_micros
        # Bundles first (DESIGN §9): what the call used so far, then the next slice's seconds.
        call.bundle_used_s = max(call.bundle_used_s, min(step.bundle_used_s, sum(h for _, h in call.bundle_holds)))
        reserve, bundle_granted = step.reserve_micros, 0
        if step.bundle_want_s > 0 and call.bundle_holds:
            periods = [self._period(slot) for slot, _ in call.bundle_holds]
            taken, reserve = nibble_bundle_draw([p.left_s for p in periods], step.bundle_want_s, step.reserve_micros)
            for period, seconds in zip(periods, taken, strict=True):
                period.reserved_s += seconds
            call.bundle_holds = [(slot, held + seconds)
                                 for (slot, held), seconds in zip(call.bundle_holds, taken, strict=True)]
            bundle_granted = sum(taken)
        # Replace the hold with the next slice, as much of it as the account still has.
        grant = max(0, min(reserve, account.available_micros))
        call.hold_micros = grant
        account.reserved_micros += grant
        self._check(account)
        result = StoreNibble(grant, step.debit_micros, bundle_granted_s=bundle_granted)
        call.seen[step.seq] = result
        return result

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, account_id: str = "",
               bundle: BundleSettle | None = None) -> None:
        self._raise_if_down()
        call = self.calls.get(call_id)
        if call is None:
            raise UnknownCall(f"settle for unknown call {call_id}")
        if call.settled:
            return
        covered = call.bundle_used_s if bundle is None else bundle.covered_s
        used = commit([held for _, held in call.bundle_holds], covered)
        for (slot, held), seconds in zip(call.bundle_holds, used, strict=True):
            period = self._period(slot)
            period.reserved_s -= held
            period.used_s += seconds
            self._check_period(period)
        if call.bundle_holds:
            self.bundle_used_by_call[call_id] = sum(used)
        call.bundle_holds = []
        account = self.accounts[call.account_id]
        account.balance_micros -= cost_micros - call.debited_micros
        account.reserved_micros -= call.hold_micros
        account.charged_micros += cost_micros
        account.calls.discard(call_id)
        call.hold_micros = 0
        call.settled = True
        self.settled[call_id] = cost_micros
        floor = account.balance_micros - account.reserved_micros + account.credit_limit_micros
        if floor < -account.overspent_micros:  # recorded, never hidden: the call really used that money
            overspend = min(-floor - account.overspent_micros, cost_micros - call.debited_micros)
            account.overspent_micros += overspend
            self.overspend_micros += overspend
            self.overspend_by_call[call_id] = overspend
        account.lowest_micros = min(account.lowest_micros, account.balance_micros)

    def release(self, call_id: str, seq: int, now_ms: int, account_id: str = "") -> None:
        self._raise_if_down()
        call = self.calls.get(call_id)
        if call is None or call.settled:
            return
        if call.debited_micros:
            self.settle(call_id, seq, call.debited_micros, now_ms)
            return
        account = self.accounts[call.account_id]
        account.reserved_micros -= call.hold_micros
        account.calls.discard(call_id)
        for slot, held in call.bundle_holds:
            self._period(slot).reserved_s -= held
        call.bundle_holds = []
        call.hold_micros = 0
        call.settled = True
        self.settled[call_id] = 0

    def open_reservations(self) -> int:
        return sum(1 for c in self.calls.values() if not c.settled)
