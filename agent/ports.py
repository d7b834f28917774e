"""Small interfaces between the services and the edge (DESIGN §2).

Services depend on these protocols; adapters implement them; tests substitute fakes that keep
the same semantics (a fake clock, an in-memory store) rather than mocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from agent.core.balance import (
    AccountState,
    AuthorizeOutcome,
    AuthorizeStep,
    BundleSettle,
    ExpireReport,
    LiveCall,
    NibbleOutcome,
    NibbleRequest,
    ReleaseOutcome,
    SettleOutcome,
    StoreAuthorization,
    StoreNibble,
)
from agent.core.bundles import BundleSlot, PeriodState
from agent.core.cdr import CallRecord
from agent.core.events import AuthorizeDecision, AuthorizeRequest, LegEvent
from agent.core.fraud import AlertRecord, CallFacts
from agent.core.fraud_rules import RuleSet
from agent.core.ratetable import RateTable
from agent.core.session import NibbleStep, RatedCall


class Clock(Protocol):
    """Time for the services; the core never reads a clock, it is given instants."""

    def now_ms(self) -> int:
        """Wall-clock milliseconds since the Unix epoch (for timestamps in CDRs)."""
        ...

    def monotonic_ms(self) -> int:
        """Milliseconds from an arbitrary origin that never goes backwards (for timers)."""
        ...


class Switch(Protocol):
    """One PBX connection as the engine sees it (an Asterisk AMI client, a FreeSWITCH socket)."""

    name: str  # "asterisk" | "freeswitch"

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        """Ask the PBX to hang up a leg. Raises on refusal or timeout; the engine then
        verifies the hangup through the leg's hangup event, and escalates if it never comes."""
        ...

    def warn(self, leg_id: str, seconds_left: int) -> None:
        """Play the low-balance warning on a leg (best effort)."""
        ...

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        """Move the PBX's own hangup of a call to ``at_ms`` (epoch ms): the billed leg's, and the
        caller leg's ceiling where the PBX keeps one. Raises on refusal; the earlier backstop
        then stays, which is never before the money ran out."""
        ...

    def connected(self) -> bool:
        ...


class SwitchAdapter(Switch, Protocol):
    """A switch adapter as the daemon runs it: the ``Switch`` port and its lifecycle."""

    def start(self) -> None:
        ...

    def stop(self, timeout_s: float = 2.0) -> None:
        ...


class CallEngine(Protocol):
    """What a switch adapter drives: the call session engine (agent/services)."""

    def authorize(self, request: AuthorizeRequest) -> AuthorizeDecision:
        """Decide a call before it is dialled. Blocks the calling greenlet for a bounded time
        (store and rating deadlines); never raises for a business refusal (allowed=False)."""
        ...

    def on_event(self, event: LegEvent) -> None:
        """Feed one leg event. Never blocks; the engine queues and processes it in order."""
        ...


class Rater(Protocol):
    """Rates a destination for an account (the account's plan, the plan's in-memory table)."""

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        """Return the tariff of the call, or raise ``RatingRefused`` with the reason."""
        ...


class RateSource(Protocol):
    """The in-memory rate table of each plan (``agent/adapters/sql/rate_repository.py``)."""

    def table_for(self, plan_name: str) -> RateTable:
        """The plan's current table (never a half-loaded one); raises ``NotFound`` for an unknown
        plan. ``RateTable.lookup(number, at_ms)`` then gives the ``RateRow`` (a ``Tariff``) or a
        ``Refusal`` whose ``reason`` is a ``DenyReason`` (bad_request, no_rate, blocked)."""
        ...


class StoreRider(Protocol):
    """Another adapter's command that may share the balance store's round trip at authorize: the
    fraud counters' observe script (``agent/adapters/redis/counters.py``) on the Redis that holds
    the balances. A store that talks to the same server offers it a place in its own pipeline
    (``queue``: the rider queues its command and says True, or says False when the pipeline is
    not of its server) and hands back what came back (``answer``: the reply, or the exception
    in its place), at most once per rider, whatever the store's own retries. A store that does
    not (SQL, in memory, a circuit open, a deadline passed first) never answers it: the rider's
    owner then makes its own round trip. Saves a send, a receive and a greenlet per call
    (bench/bench_fraud.py --fastagi)."""

    def queue(self, client: object, pipeline: Any) -> bool:
        ...

    def answer(self, reply: object) -> None:
        ...


class BalanceStore(Protocol):
    """Balances and reservations shared by every node, in money (micro-units) only.

    The rules are in ``agent/core/balance.py``; two implementations pass one contract suite
    (``tests/test_balance_store_contract.py``): Redis (``agent/adapters/redis/store.py``, many
    nodes) and SQL (``agent/adapters/sql/balance_store.py``, the embedded single-node default).
    Every step is idempotent per ``(call_id, seq)``: authorize is seq 0, nibbles 1, 2, ...
    Instants are milliseconds since the epoch given by the caller. A store that cannot be
    reached raises ``StoreUnavailable`` (``agent.services.store_guard`` applies the configured
    failure policy and deadline); business refusals are outcomes, never exceptions.
    ``account_id`` on the per-call steps is an optional hint: the store knows each call's
    account, but a settle for a call it lost (cache restart) can only be charged with it.
    """

    def authorize(self, account_id: str, call_id: str, node: str, want_micros: int, min_micros: int,
                  now_ms: int, ttl_ms: int, *, bundle_slots: Sequence[BundleSlot] = (),
                  bundle_want_s: int = 0, rider: StoreRider | None = None) -> AuthorizeOutcome:
        """Check status, concurrent calls (all nodes) and ``available >= min_micros``; reserve
        ``min(want, available)`` for the first slice. A known call_id returns its stored outcome.

        With ``bundle_slots`` (DESIGN §9), the first slice's ``bundle_want_s`` seconds are taken
        from those periods first, in order (``authorize_with_bundles`` in agent/core/balance.py):
        a period is opened on first use with its allowance (plus the rollover of the period
        before), as a ``bundle_usage`` ledger row. ``rider``: see ``StoreRider``."""
        ...

    def authorize_many(self, steps: Sequence[AuthorizeStep], *,
                       rider: StoreRider | None = None) -> list[AuthorizeOutcome]:
        """Several authorizes at once (one round trip where the store can), outcomes in step
        order, each exactly as ``authorize`` would give it (no bundles): the levels above a
        reseller's customer. They are independent: one refused changes nothing of the others."""
        ...

    def debit_and_reserve(self, call_id: str, seq: int, debit_micros: int, reserve_micros: int,
                          now_ms: int, ttl_ms: int, *, account_id: str | None = None) -> NibbleOutcome:
        """One nibble: debit the slice just used (overrun recorded if beyond the reservation) and
        hold up to ``reserve_micros`` for the next slice; renews the TTL."""
        ...

    def debit_and_reserve_many(self, requests: Sequence[NibbleRequest]) -> list[NibbleOutcome]:
        """Many nibbles in one round trip (one Redis pipeline); outcomes in request order."""
        ...

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, *,
               account_id: str | None = None, bundle: BundleSettle | None = None) -> SettleOutcome:
        """Commit the call's final cost: one ledger ``charge:{call_id}``, the rest released; and
        ``bundle.covered_s`` bundle seconds over the periods it held, in draw order (one
        ``bundle_usage`` row ``bundle:{call_id}:{grant_id}`` each), the rest of the holds given
        back. Raises ``UnknownCall`` for a call the store does not know when no account is given."""
        ...

    def bundle_periods(self, account_id: str) -> dict[tuple[int, int], PeriodState]:
        """The account's opened bundle periods as the store sees them now, by
        ``(grant_id, period_start_ms)``: granted, used, and reserved by live calls."""
        ...

    def release(self, call_id: str, seq: int, now_ms: int, *,
                account_id: str | None = None) -> ReleaseOutcome:
        """End a call without a charge (denied, unanswered); nibble debits, if any, are charged."""
        ...

    def expire(self, now_ms: int, *, limit: int = 1000) -> ExpireReport:
        """Sweep reservations not renewed within their TTL and retry pending ledger writes.
        Any node may run it; concurrent sweepers are harmless."""
        ...

    def live_calls(self) -> list[LiveCall]:
        """Open reservations on every node (operators)."""
        ...

    def account_state(self, account_id: str) -> AccountState:
        """Balance, reserved and available as the store sees them (raises NotFound)."""
        ...

    def shard_of(self, account_id: str) -> str:
        """The part of the store that holds the account's keys: a Redis Cluster master's name
        (``host:port``, as the client's slot map says now), "" for a store in one piece (one
        Redis, a Sentinel's master, SQL). ``StoreGuard`` keeps a circuit and a journal order per
        shard, so a dead master stops only its own accounts' calls. Local: no round trip, never
        raises."""
        ...

    def close(self) -> None:
        ...


class EngineStore(Protocol):
    """The balance store as the call engine uses it, in money terms (one per process).

    Implemented by ``agent.services.store_port.EngineStoreAdapter`` over a ``BalanceStore``
    (the daemon: Redis or SQL behind ``StoreGuard``, which owns the deadline and the failure
    policy) and by the in-memory store of the simulations (``agent.sim.memory_store``); both
    pass ``tests/test_engine_store_contract.py``. The engine puts no deadline of its own on
    these calls: one layer owns it (a second, racing deadline kept the guard's circuit and its
    ``fail_open`` credit from ever taking effect). Each step carries its call's account, so no
    layer keeps a call -> account map. A store that cannot answer returns a refusal or a
    ``StoreNibble(ok=False)`` (fail closed) rather than raising; ``settle`` and ``release``
    raise only for a step they cannot take (``BillingError``: permanent; anything else:
    transient, retried).
    """

    def authorize(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                  now_ms: int, *, bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                  rider: StoreRider | None = None) -> StoreAuthorization:
        ...

    def authorize_with_levels(self, account_id: str, call_id: str, want_micros: int, min_micros: int,
                              levels: Sequence[tuple[str, str, int, int]], now_ms: int, *,
                              bundle_slots: Sequence[BundleSlot] = (), bundle_want_s: int = 0,
                              rider: StoreRider | None = None,
                              ) -> tuple[StoreAuthorization, list[StoreAuthorization]]:
        """A reseller's customer and the levels above it, ``(call id, account, want, minimum)``
        each, at once (one round trip where the store can): the customer's answer as
        ``authorize`` gives it, and each level's in order (no bundles). Each is its own step: one
        refused changes nothing of the others (the caller releases what it does not use)."""
        ...

    def nibbles(self, steps: list[NibbleStep], now_ms: int) -> list[StoreNibble]:
        """Outcomes in step order; each step idempotent per (call_id, seq)."""
        ...

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, account_id: str,
               bundle: BundleSettle | None = None) -> None:
        ...

    def release(self, call_id: str, seq: int, now_ms: int, account_id: str) -> None:
        ...


class CdrSink(Protocol):
    """Where the engine hands every settled call (``agent/services/cdr_pipeline.py``).

    ``submit`` never waits on the database: it appends the record to the node's local spool and
    returns. A record whose ``submit`` returned is on disk in the kernel (it survives ``kill -9``
    of the agent) and is fsync'd within the sink's group-commit interval (it then survives a power
    loss); it reaches SQL later, in batches, exactly once. ``submit`` raises when the record
    could not be spooled (disk full, spool over ``cdr.spool_max_mb``): the sink keeps it in
    memory and still tries to write it to SQL, and the caller should raise an alarm.
    """

    def submit(self, record: CallRecord) -> None:
        """Append one settled call to the spool (microseconds, no database round trip)."""
        ...

    def start(self) -> None:
        """Start the writer: replay what an earlier run left in the spool, then follow it."""
        ...

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record submitted so far is in SQL; False when the time ran out."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Flush for at most ``timeout_s``, fsync and stop; what is left stays in the spool."""
        ...


class FraudActions(Protocol):
    """What the fraud service writes, off the call path (``agent/adapters/sql/fraud.py``). Each
    method may raise when the database is away: the service keeps the work queued and retries."""

    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        """Append alerts to the ``alerts`` table (one transaction)."""
        ...

    def suspend(self, account_id: str, rule: str, at_ms: int) -> bool:
        """Set the account suspended, naming the rule and the instant (and push the status into
        the balance store); False when it was not active."""
        ...

    def cut_elsewhere(self, account_id: str, node: str, reason: str) -> list[str]:
        """Ask the other nodes to hang up the account's live calls; the call ids asked for."""
        ...


class ObserveRider(StoreRider, Protocol):
    def figures(self) -> dict[str, int] | None:
        """What ``observe`` returns, from the reply the store brought back; None when it brought
        none (not queued, not answered, or an error in the reply's place)."""
        ...


class FraudCounters(Protocol):
    """The figures of the fraud rules per account (``agent/core/fraud.py``): ``LocalCounters`` in
    memory (one node) or ``agent/adapters/redis/counters.py`` (shared by every node). Instants are
    the caller's. A ``shared`` implementation does a round trip and may raise."""

    shared: bool

    def set_rules(self, rules: RuleSet) -> None:
        ...

    def observe(self, facts: CallFacts) -> dict[str, int]:
        """Count a new call (an attempt, and live until ``forget`` or ``ended``); every rule's
        figure for it by rule name."""
        ...

    def observe_rider(self, facts: CallFacts) -> ObserveRider | None:
        """``observe`` as a command that can ride in the balance store's round trip (``shared``
        counters), or None (in memory: ``observe`` costs no trip)."""
        ...

    def forget(self, account_id: str, call_id: str) -> None:
        """A call counted by ``observe`` was refused: it is not live."""
        ...

    def ended(self, account_id: str, call_id: str, at_ms: int, cost_micros: int, answered: bool,
              duration_ms: int) -> dict[str, int]:
        """A settled call: no longer live; its cost and length go into the settle figures, whose
        values after it are returned by rule name (spend and short_calls rules)."""
        ...
