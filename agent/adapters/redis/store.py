"""The multi-node balance store: hot balances and reservations in Redis, the ledger in SQL.

Every check-and-change is one Lua script on the keys of one account (one hash tag, one
cluster slot; see keys.py), loaded once and run by SHA. Scripts return plain replies; this
module turns them into the port's outcomes (agent/core/balance.py), loads accounts missing
from Redis from the SQL ledger, and writes each closed call's ledger entries (ledger.py).

Bundle seconds (DESIGN §9) ride the same scripts: each period a call may draw on is a hash on
the account's slot (``acct:{ID}:bp:{grant}:{start}``: granted, used, reserved), opened on first
use with its rollover, and the call's holds are in its call hash, in draw order (keys.py, and
prelude.lua for the rules). Period openings and uses reach ``bundle_periods``/``bundle_usage`` in
SQL through the ledger writer, with the SQL store's references (ledger.py).

Spend caps (DESIGN §8, core/budgets.py) ride them too: the caps and the plan's timezone are in
the account hash (loaded from SQL with the account, and by ``refresh``: ``limits set`` reaches a
running store), the day and month counters (spent, held) on the account's slot
(``acct:{ID}:spend:d:{start}`` / ``:m:{start}``), the day and month a call counts on in its call
hash. Lua has no timezone database, so the local day and month of an authorize are computed here:
the store keeps each account's timezone in memory once a script told it, passes the timezone it
used with the day and month, and the authorize script answers ``tz`` when that is not the
account's (an account seen for the first time, a plan whose timezone changed); the store then
computes again and runs the script once more. The hot path pays nothing for it: no extra round
trip, no extra read (an account without caps never asks; one with caps costs one extra round
trip per process, the first time), and the day and month of a timezone are cached until its
next midnight. Spent reaches ``spend_periods`` with the call's ledger entries, which is where a
rebuild recovers it (ledger.py).

Redis calls fail fast: the client has a socket timeout and no retries of its own
(``make_client``), and connection errors become ``StoreUnavailable`` for the failure policy.
Redis must run with ``maxmemory-policy noeviction``: an evicted key would be money forgotten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, ClusterError, NoScriptError, RedisClusterException, TryAgainError
from redis.retry import Retry
from sqlalchemy import select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.redis.connect import RedisClient, fast_packing, make_cluster_client, make_sentinel_client
from agent.adapters.redis.keys import PERIODS_MARK, SLOTS, AccountKeys, KeySpace
from agent.adapters.redis.ledger import (
    CallRecord,
    parse_period_id,
    post_call,
    post_openings,
    rebuild_account,
    record_from,
    text,
)
from agent.adapters.redis.poster import LedgerPoster
from agent.adapters.redis.scripts import Scripts
from agent.adapters.sql.models import Account
from agent.core.balance import (
    MAX_STORE_MICROS,
    AccountState,
    AuthorizeOutcome,
    AuthorizeStep,
    BundleSettle,
    DenyReason,
    ExpireReport,
    LiveCall,
    NibbleOutcome,
    NibbleRequest,
    NibbleStatus,
    ReleaseOutcome,
    ReleaseStatus,
    SettleOutcome,
    SettleStatus,
    StoreUnavailable,
    UnknownCall,
    check_authorize,
    check_bundle_request,
    check_call_id,
    check_micros,
    check_nibble,
)
from agent.core.budgets import SpendPeriods, spend_periods
from agent.core.bundles import BundleSlot, PeriodState
from agent.core.errors import BillingError, Conflict, InvalidInput, NotFound
from agent.core.session import is_level_call_id
from agent.ports import StoreRider
from agent.redis_url import parse_redis_url

log = logging.getLogger(__name__)

CLOSED_RETENTION_MS = 24 * 3600 * 1000  # a closed call's record answers replays for a day
CALL_ACCOUNT_TTL_S = 7 * 24 * 3600  # call -> account hint (longest call we resume after a restart)
LOCAL_CALL_CACHE_MAX = 200_000
LOCAL_ZONE_CACHE_MAX = 100_000  # accounts whose plan's timezone this process remembers
_DAY_AFTER_MS = 26 * 3600 * 1000  # past the end of any local day (23 to 25 hours) from its start
RETRY_PENDING_MS = 5_000  # a call whose ledger write failed is looked at again this soon
SWEEP_SLOTS = 1024  # per-slot indexes a cluster sweep reads in one script (keeps each under ~2 ms)
# After a master's replication id changes, the accounts changed in SQL since this long before the
# last sweep that saw the old one are rebuilt from the ledger (see _watch_replication).
REBUILD_LOOKBACK_MS = 10 * 60 * 1000
MARKER_KEEP_MS = 7 * 86_400_000  # a replication marker no sweep refreshed for this long expires
NIBBLE_BATCH = 256  # nibbles per run of nibbles.lua (each ~25-50 us of Redis: a run blocks it ~10 ms at most)
NIBBLE_BATCH_MIN = 2  # fewer: the one-script pipeline


MAX_CONNECTIONS = 256  # per process; a burst beyond it waits for a free connection


class _ReadinessPoller:
    """``select.poll()`` for redis-py's hiredis parser under gevent. Before every command the
    pool asks each connection ``can_read()`` (a poll with timeout 0); gevent's patched poll turns
    that into a trip through the hub, so every Redis call yielded to every other ready greenlet
    (about 0.3 ms per call under load in the FastAGI bench). A zero-timeout poll never blocks,
    so it can use the real system call; any other timeout still goes through gevent."""

    def __init__(self, original: Any, cooperative: Any) -> None:
        self._original, self._cooperative = original, cooperative
        self._registered: list[tuple[Any, int]] = []

    def register(self, fd: Any, eventmask: int) -> None:
        self._registered.append((fd, eventmask))

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        poller = self._original() if timeout == 0 else self._cooperative()
        for fd, mask in self._registered:
            poller.register(fd, mask)
        return list(poller.poll(timeout))


class _SelectForRedis:
    """The ``select`` module as redis-py's hiredis parser sees it, with ``_ReadinessPoller``."""

    def __init__(self, module: Any, original_poll: Any) -> None:
        self._module, self._original_poll = module, original_poll

    def poll(self) -> _ReadinessPoller:
        return _ReadinessPoller(self._original_poll, self._module.poll)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _fast_readiness_checks() -> None:
    from gevent import monkey

    try:
        import redis._parsers.hiredis as parser
    except ImportError:  # another redis-py layout: keep its behaviour
        return
    current = getattr(parser, "select", None)
    if current is None or isinstance(current, _SelectForRedis) or not monkey.is_object_patched("select", "poll"):
        return
    parser.select = _SelectForRedis(current, monkey.get_original("select", "poll"))  # type: ignore[assignment,attr-defined]


def make_client(url: str, timeout_ms: int, *, max_connections: int = MAX_CONNECTIONS) -> RedisClient:
    """A client whose every call gives up after ``timeout_ms`` and never retries by itself
    (redis-py's default retries with backoff would turn 250 ms into seconds). Its pool makes a
    caller beyond ``max_connections`` wait (up to ``timeout_ms``) for a connection instead of
    failing at once: redis-py's default pool refuses the 101st concurrent caller, which turned a
    burst of 500 authorizations into 396 ``store_unavailable`` denials.

    ``redis+cluster://`` and ``redis+sentinel://`` URLs give the clients of connect.py (agent/redis_url.py
    has the syntax); a cluster URL none of whose seeds answers raises ``RedisSetupError``."""
    _fast_readiness_checks()
    target = parse_redis_url(url)
    if target.mode == "cluster":
        return make_cluster_client(target, timeout_ms)
    if target.mode == "sentinel":
        return make_sentinel_client(target, timeout_ms)
    seconds = timeout_ms / 1000
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=seconds, socket_timeout=seconds,
        socket_connect_timeout=seconds, retry=Retry(NoBackoff(), 0), decode_responses=True)
    pool.connection_class = fast_packing(pool.connection_class)  # before any connection is made
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def _slot_arg(slot: BundleSlot) -> str:
    """A bundle slot as the scripts read it: 'grant,start,seconds,expires,carry_from' (see prelude.lua)."""
    for name in ("grant_id", "period_start_ms", "seconds", "expires_ms", "carry_from_ms"):
        value = getattr(slot, name)
        if value is None and name == "carry_from_ms":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
            raise InvalidInput(f"bundle slot {slot!r}: {name} must be a whole number")
    if slot.grant_id < 0 or not 0 <= slot.seconds <= MAX_STORE_MICROS:
        raise InvalidInput(f"bundle slot {slot!r}: grant id and seconds must be 0 or more (seconds below 2**53)")
    carry = "" if slot.carry_from_ms is None else str(slot.carry_from_ms)
    return f"{slot.grant_id},{slot.period_start_ms},{slot.seconds},{slot.expires_ms},{carry}"


def _check_bundle_seconds(slots: Sequence[BundleSlot], seconds: int) -> list[str]:
    check_bundle_request(slots, seconds)
    if seconds > MAX_STORE_MICROS:
        raise InvalidInput(f"bundle seconds {seconds} must be below 2**53")
    return [_slot_arg(slot) for slot in slots]


def _reply_int(reply: Sequence[str], index: int) -> int:
    return int(reply[index]) if len(reply) > index and reply[index] != "" else 0


def _masters(client: RedisCluster) -> dict[str, tuple[Any, list[int]]]:
    """Each master of the client's slot map (by name): its node and the slots it serves."""
    by_master: dict[str, tuple[Any, list[int]]] = {}
    for slot, nodes in client.nodes_manager.slots_cache.items():
        if nodes:
            by_master.setdefault(nodes[0].name, (nodes[0], []))[1].append(slot)
    return by_master


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis unavailable during {what}: {exc}") from exc
    except (ClusterError, ClusterDownError, TryAgainError, RedisClusterException) as exc:
        # A master lost and not replaced yet, slots migrating: the same for the failure policy.
        raise StoreUnavailable(f"Redis Cluster unavailable during {what}: {exc}") from exc
    except OperationalError as exc:
        raise StoreUnavailable(f"SQL database unavailable during {what}: {exc.orig}") from exc


class RedisBalanceStore:
    """Implements the ``BalanceStore`` port (agent/ports.py) for many nodes sharing one Redis."""

    def __init__(self, client: RedisClient, sessions: sessionmaker[Session], *, key_prefix: str = "",
                 closed_retention_ms: int = CLOSED_RETENTION_MS, post_later: bool = False) -> None:
        """``post_later``: a closed call's ledger entries are written to SQL by a greenlet right
        after the step instead of inside it (poster.py says why; the daemon's store does this).
        Without it (the CLI, tests) a step returns once its entries are in SQL."""
        self._client = client
        self._poster = LedgerPoster() if post_later else None
        self._sessions = sessions
        self._keys = KeySpace(key_prefix, per_slot_index=isinstance(client, RedisCluster))
        self._sweep_turn = 0
        self._slot_indexes: list[str] | None = None  # a cluster's per-slot index keys, by slot
        self._scripts = Scripts()
        self._retention_ms = closed_retention_ms
        self._call_accounts: dict[str, str] = {}
        self._zones: dict[str, str] = {}  # account -> its plan's timezone, as the scripts last said
        self._periods: dict[str, tuple[int, int, SpendPeriods]] = {}  # timezone -> [from, until) -> periods
        self._replids_refused = False  # INFO refused once: logged once
        self._batched = True  # nibbles as runs of nibbles.lua (off once a server refuses them)

    @property
    def client(self) -> RedisClient:
        """The store's client: an adapter given this one (the daemon's fraud counters) can have a
        command ride in the store's authorize round trip (``StoreRider``, agent/ports.py)."""
        return self._client

    # ------------------------------------------------------------------ plumbing

    def _execute(self, build: Callable[[Any], object], ride: _Ride | None = None) -> list[Any]:
        """Run a pipeline (one round trip); load the scripts and rerun on NOSCRIPT. Every
        command queued here is idempotent, so running the whole pipeline again is safe. A
        ``ride``'s command goes last, once: its reply is its own (an error there is not ours), and
        the rerun leaves it out."""
        self._scripts.ensure_loaded(self._client)
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            build(pipe)
            boarded = ride is not None and ride.board(self._client, pipe)
            results = pipe.execute(raise_on_error=False)
            if boarded and ride is not None:
                ride.answer(results.pop())
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                log.info("Redis lost its script cache; loading the scripts again")
                self._scripts.load(self._client)
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results
        raise AssertionError("unreachable")

    def _with_account(self, account_id: str, run: Callable[[], list[Any]]) -> list[Any]:
        """Run a script; if the account is missing from Redis, load it from SQL and run again."""
        reply = run()
        if reply[0] != "noacct":
            return reply
        self._rebuild(account_id, "if_absent")
        return run()

    @staticmethod
    def _step_keys(ak: AccountKeys, call_id: str) -> list[str]:
        """KEYS of settle.lua and close.lua."""
        return [ak.account, ak.live, ak.call(call_id), ak.unposted, ak.periods, ak.periods_unposted]

    def _remember(self, call_id: str, account_id: str) -> None:
        if len(self._call_accounts) >= LOCAL_CALL_CACHE_MAX:
            self._call_accounts.clear()
        self._call_accounts[call_id] = account_id

    def _accounts_of(self, call_ids: Sequence[str], hints: Sequence[str | None]) -> list[str | None]:
        """The account of each call: this node's memory, else Redis, else the caller's hint."""
        found: list[str | None] = [self._call_accounts.get(c) for c in call_ids]
        if self._keys.per_slot_index:  # on a cluster the hint may sit on another master: the caller's first
            found = [a if a is not None else h for a, h in zip(found, hints, strict=True)]
        missing = [i for i, a in enumerate(found) if a is None]
        if missing:
            stored = self._execute(lambda p: [p.get(self._keys.call_account(call_ids[i])) for i in missing])
            for i, account_id in zip(missing, stored, strict=True):
                found[i] = text(account_id) if account_id is not None else hints[i]
        return found

    def _forget(self, account_id: str, call_id: str) -> None:
        """The call is closed and in the ledger: the sweeper need not look at it again. (Its
        account hint stays: replays of its steps must still find the call's record.)"""
        self._client.zrem(self._keys.index_of(account_id), self._keys.member(account_id, call_id))

    def _post(self, account_id: str, call_id: str, record: CallRecord) -> bool:
        posted = post_call(self._client, self._scripts, self._keys, self._sessions, account_id, call_id, record,
                           self._retention_ms)
        if posted:
            self._forget(account_id, call_id)
        return posted

    def _post_or_retry(self, account_id: str, call_id: str, record: CallRecord, now_ms: int) -> bool:
        """Post a closed call; when SQL refuses, the sweeper looks at it again after RETRY_PENDING_MS."""
        posted = self._post(account_id, call_id, record)
        if not posted:
            self._client.zadd(self._keys.index_of(account_id),
                              {self._keys.member(account_id, call_id): now_ms + RETRY_PENDING_MS})
        return posted

    def _post_closed(self, account_id: str, call_id: str, record: CallRecord, now_ms: int) -> bool | None:
        """Post a closed call now (True/False), or queue it for the poster (None)."""
        if self._poster is None:
            return self._post_or_retry(account_id, call_id, record, now_ms)
        self._poster.submit(self._keys.member(account_id, call_id),
                            partial(self._post_or_retry, account_id, call_id, record, now_ms))
        return None

    @property
    def ledger_backlog(self) -> int:
        """Closed calls this process has queued for the SQL ledger and not written yet."""
        return 0 if self._poster is None else len(self._poster)

    def flush_ledger(self, timeout_s: float) -> bool:
        """Write what the poster holds (True: nothing is left), waiting at most ``timeout_s``."""
        return True if self._poster is None else self._poster.drain(timeout_s)

    def _spend_periods(self, timezone: str, now_ms: int) -> SpendPeriods:
        """The local day and month of ``now_ms`` in ``timezone``, cached until its next midnight."""
        cached = self._periods.get(timezone)
        if cached is not None and cached[0] <= now_ms < cached[1]:
            return cached[2]
        periods = spend_periods(timezone, now_ms)
        until = spend_periods(timezone, periods.day_start_ms + _DAY_AFTER_MS).day_start_ms
        self._periods[timezone] = (periods.day_start_ms, until, periods)
        return periods

    def _spend_args(self, account_id: str, now_ms: int) -> list[object]:
        """ARGV 10-12 of authorize.lua: the timezone this store believes the account's plan has
        ('' when it does not know: the script answers with it if the account has a cap), and the
        day and month of ``now_ms`` there."""
        timezone = self._zones.get(account_id)
        if timezone is None:
            return ["", 0, 0]
        periods = self._spend_periods(timezone, now_ms)
        return [timezone, periods.day_start_ms, periods.month_start_ms]

    def _learn_zone(self, account_id: str, timezone: str) -> None:
        spend_periods(timezone, 0)  # an unknown timezone is refused here, by name
        if len(self._zones) >= LOCAL_ZONE_CACHE_MAX:
            self._zones.clear()
        self._zones[account_id] = timezone

    # ------------------------------------------------------------------ authorize

    def _queue_authorize(self, p: Any, st: AuthorizeStep, slots: list[str], *, hint: bool) -> None:
        """Queue one authorize on the pipeline ``p``: one script, which also writes the sweeper's
        index entries (the call's, and the account's periods' when it opened one) and, with
        ``hint`` on one server, the call -> account hint, only for what it created (on a Cluster
        the hint lives in the call's own slot: written after, ``_write_call_hint``). The spend
        arguments are read now: a pipeline built again after a 'tz' reply has the new ones."""
        keys, args = self._authorize_arguments(st, slots, hint=hint)
        self._scripts.call(p, "authorize", keys, args)

    def _authorize_arguments(self, st: AuthorizeStep, slots: list[str], *,
                             hint: bool) -> tuple[list[str], list[object]]:
        """authorize.lua's KEYS and ARGV for one step."""
        ak = self._keys.of(st.account_id)
        keys = [ak.account, ak.live, ak.call(st.call_id), ak.periods, ak.periods_unposted,
                self._keys.index_of(st.account_id)]
        if hint and not self._keys.per_slot_index:
            keys.append(self._keys.call_account(st.call_id))
        return keys, [st.account_id, st.call_id, st.node, st.want_micros, st.min_micros, st.now_ms, st.ttl_ms,
                      ak.period_prefix, st.bundle_want_s, *self._spend_args(st.account_id, st.now_ms),
                      ak.spend_prefix, self._keys.member(st.account_id, st.call_id),
                      self._keys.periods_member(st.account_id), CALL_ACCOUNT_TTL_S, *slots]

    def _queue_authorizes(self, p: Any, checked: Sequence[tuple[AuthorizeStep, list[str]]]) -> None:
        """Queue a chain's steps as one run of authorizes.lua (one server only): one argument per
        step, its key count, KEYS and ARGV each ended by a newline."""
        packed = []
        for st, slots in checked:
            keys, args = self._authorize_arguments(st, slots, hint=not is_level_call_id(st.call_id))
            packed.append("".join(f"{field}\n" for field in (len(keys), *keys, *args)))
        self._scripts.call(p, "authorizes", [], packed)

    def _chained(self, count: int) -> bool:
        """A chain's steps go as one script: more than one step, one server (a Cluster spreads a
        chain's accounts over its masters) that took authorizes.lua (Redis 7.0 and later)."""
        return (count > 1 and self._batched and not self._keys.per_slot_index
                and "authorizes" not in self._scripts.refused)

    def authorize(self, account_id: str, call_id: str, node: str, want_micros: int, min_micros: int,
                  now_ms: int, ttl_ms: int, *, bundle_slots: Sequence[BundleSlot] = (),
                  bundle_want_s: int = 0, rider: StoreRider | None = None) -> AuthorizeOutcome:
        check_authorize(call_id, want_micros, min_micros, ttl_ms)
        slots = _check_bundle_seconds(bundle_slots, bundle_want_s)
        step = AuthorizeStep(account_id, call_id, node, want_micros, min_micros, now_ms, ttl_ms, tuple(bundle_slots),
                             bundle_want_s)
        ride = _Ride(rider)

        def build(p: Any) -> None:
            self._queue_authorize(p, step, slots, hint=True)

        def run() -> list[Any]:
            for _ in (1, 2):  # twice at most: the script names the timezone when it was not the one used
                results = self._execute(build, ride)
                reply = [text(v) for v in results[0]]
                if reply[0] != "tz":
                    return reply
                self._learn_zone(account_id, reply[1])
            raise RuntimeError(f"authorize of call {call_id!r}: the timezone of account {account_id!r} "
                               f"keeps changing ({reply[1]!r})")

        with _unavailable("authorize"):
            try:
                reply = self._with_account(account_id, run)
            except NotFound:
                reply = ["deny", "unknown_account", "0", "", ""]
            outcome = self._authorize_outcome(account_id, call_id, reply)
        if self._keys.per_slot_index and outcome.allowed and not outcome.replayed:
            self._write_call_hint(call_id, account_id)
        return outcome

    def authorize_many(self, steps: Sequence[AuthorizeStep], *,
                       rider: StoreRider | None = None) -> list[AuthorizeOutcome]:
        """Every step's commands as ``authorize`` queues them, in one round trip: a reseller's
        customer and the levels above it. On one server the steps run as one script
        (authorizes.lua: authorize.lua once per step, each its own idempotent step); on a
        Cluster, or a server that refused that script, as a pipeline of one authorize.lua each
        (a cluster client splits it by master). A
        step whose account is not in Redis, or whose account has a spend cap in a timezone this
        store does not know yet, is then run again alone (``authorize``): the first pass changed
        nothing for it. The call -> account hint is written for a call's own id, not for a
        level's (``^L``): the levels' later steps always name their account."""
        checked = [(st, _check_bundle_seconds(st.bundle_slots, st.bundle_want_s)) for st in steps]
        for st in steps:
            check_authorize(st.call_id, st.want_micros, st.min_micros, st.ttl_ms)
        if not steps:
            return []
        def build(p: Any) -> None:  # one script per step: step i's reply is the pipeline's i-th
            for st, slots in checked:
                self._queue_authorize(p, st, slots, hint=not is_level_call_id(st.call_id))

        ride = _Ride(rider)
        with _unavailable("authorize"):
            results: list[Any] | None = None
            if self._chained(len(steps)):
                try:  # authorizes.lua: one script, step i's reply its i-th
                    results = self._execute(lambda p: self._queue_authorizes(p, checked), ride)[0]
                except redis.ResponseError as exc:  # refused as a whole: nothing ran; the pipeline
                    if "authorizes.lua" in str(exc) or not any(w in str(exc).lower() for w in ("shebang", "flag")):
                        raise
                    self._scripts.refused["authorizes"] = str(exc)
                    log.warning("balance store: a chain's levels run one script each from now on (%s)", exc)
            if results is None:
                results = self._execute(build, ride)
        outcomes: list[AuthorizeOutcome] = []
        for st, result in zip(steps, results, strict=True):
            reply = [text(v) for v in result]
            if reply[0] in ("noacct", "tz"):
                outcomes.append(self.authorize(st.account_id, st.call_id, st.node, st.want_micros, st.min_micros,
                                               st.now_ms, st.ttl_ms, bundle_slots=st.bundle_slots,
                                               bundle_want_s=st.bundle_want_s))
                continue
            with _unavailable("authorize"):
                outcome = self._authorize_outcome(st.account_id, st.call_id, reply)
            if (self._keys.per_slot_index and outcome.allowed and not outcome.replayed
                    and not is_level_call_id(st.call_id)):
                self._write_call_hint(st.call_id, st.account_id)
            outcomes.append(outcome)
        return outcomes

    def _write_call_hint(self, call_id: str, account_id: str) -> None:
        """On a cluster the call -> account hint lives in the call's own slot, on any master: it is
        written after the authorization, and a master that cannot take it costs the hint only
        (steps from the engine name their account; the hint serves steps that do not)."""
        try:
            self._client.set(self._keys.call_account(call_id), account_id, ex=CALL_ACCOUNT_TTL_S)
        except redis.RedisError as exc:
            log.warning("call=%s account=%s: the call's account hint was not written (%s); steps that name the "
                        "account are not affected", call_id, account_id, exc)

    def _authorize_outcome(self, account_id: str, call_id: str, reply: list[str]) -> AuthorizeOutcome:
        status = reply[0]
        if status == "ok":
            self._remember(call_id, account_id)
            return AuthorizeOutcome(call_id, True, None, int(reply[1]), int(reply[2]), reply[3], reply[4],
                                    bundle_granted_s=int(reply[5]), bundle_available_s=int(reply[6]))
        if status == "replay":
            if reply[5] != account_id:
                raise Conflict(f"call {call_id!r} is already authorized on account {reply[5]!r}")
            self._remember(call_id, account_id)
            return AuthorizeOutcome(call_id, True, None, int(reply[1]), int(reply[2]), reply[3], reply[4],
                                    replayed=True, bundle_granted_s=int(reply[6]), bundle_available_s=int(reply[7]))
        if status != "deny":
            raise RuntimeError(f"authorize script answered {reply!r}")
        # a denied call left no trace: authorize.lua writes the index entry and the hint only for a call it made
        return AuthorizeOutcome(call_id, False, DenyReason(reply[1]), 0, int(reply[2]), reply[3], reply[4],
                                bundle_available_s=_reply_int(reply, 5))

    # ------------------------------------------------------------------ nibbles

    def debit_and_reserve(self, call_id: str, seq: int, debit_micros: int, reserve_micros: int,
                          now_ms: int, ttl_ms: int, *, account_id: str | None = None) -> NibbleOutcome:
        return self.debit_and_reserve_many(
            [NibbleRequest(call_id, seq, debit_micros, reserve_micros, now_ms, ttl_ms, account_id)])[0]

    def debit_and_reserve_many(self, requests: Sequence[NibbleRequest]) -> list[NibbleOutcome]:
        """All nibbles in one pipeline (one round trip); an account missing from Redis is loaded
        and its nibbles run again (they changed nothing the first time)."""
        for r in requests:
            check_nibble(r)
            _check_bundle_seconds((), max(r.bundle_used_s, r.bundle_want_s))
        with _unavailable("nibble"):
            accounts = self._accounts_of([r.call_id for r in requests], [r.account_id for r in requests])
            known = [(i, r, a) for i, (r, a) in enumerate(zip(requests, accounts, strict=True)) if a is not None]
            replies = self._nibble_replies([(r, a) for _, r, a in known])
            outcomes = [NibbleOutcome(r.call_id, r.seq, NibbleStatus.UNKNOWN_CALL, 0, 0) for r in requests]
            for (i, request, account_id), first in zip(known, replies, strict=True):
                reply = first
                if reply[0] == "noacct":
                    reply = self._with_account(account_id, partial(self._nibble_one, request, account_id))
                if reply[0] == "noacct":  # the account is gone from SQL too
                    continue
                outcomes[i] = NibbleOutcome(request.call_id, request.seq, NibbleStatus(reply[0]), int(reply[1]),
                                            int(reply[2]), int(reply[3]), int(reply[4]),
                                            bundle_granted_s=_reply_int(reply, 5),
                                            bundle_held_s=_reply_int(reply, 6))
            return outcomes

    def _nibble_one(self, request: NibbleRequest, account_id: str) -> list[str]:
        return self._nibble_replies([(request, account_id)])[0]

    def _nibble_replies(self, items: Sequence[tuple[NibbleRequest, str]]) -> list[list[str]]:
        if self._batched and len(items) >= NIBBLE_BATCH_MIN:
            replies = self._batched_nibble_replies(items)
            if replies is not None:
                return replies
        return self._pipelined_nibble_replies(items)

    def _batched_nibble_replies(self, items: Sequence[tuple[NibbleRequest, str]]) -> list[list[str]] | None:
        """The nibbles as runs of nibbles.lua, one per master and ``NIBBLE_BATCH`` nibbles; None
        when a server cannot take them that way (a slot moving, a Redis older than 7.0): the
        caller sends them as a pipeline, where a nibble already applied answers 'replayed'."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        client = self._client
        if isinstance(client, RedisCluster):
            cache = client.nodes_manager.slots_cache
            for i, (_, account_id) in enumerate(items):
                nodes = cache.get(key_slot(self._keys.of(account_id).account.encode()))
                if not nodes:
                    return None  # a slot nobody serves now: the pipeline's error says so
                groups.setdefault(nodes[0].name, (nodes[0], []))[1].append(i)
            servers = {name: client.get_redis_connection(node) for name, (node, _) in groups.items()}
        else:
            groups[""] = (None, list(range(len(items))))
            servers = {"": client}
        replies: list[list[str]] = [[] for _ in items]
        for name, (_, positions) in groups.items():
            for start in range(0, len(positions), NIBBLE_BATCH):
                chunk = positions[start:start + NIBBLE_BATCH]
                args: list[str] = []
                for i in chunk:  # one argument per nibble, its 15 fields each ended by a newline (nibbles.lua)
                    r, account_id = items[i]
                    ak = self._keys.of(account_id)
                    args.append(f"{ak.account}\n{ak.live}\n{ak.call(r.call_id)}\n{ak.periods}\n{ak.periods_unposted}\n"
                                f"{r.call_id}\n{r.seq}\n{r.debit_micros}\n{r.reserve_micros}\n{r.now_ms}\n{r.ttl_ms}\n"
                                f"{r.bundle_used_s}\n{r.bundle_want_s}\n{ak.period_prefix}\n{ak.spend_prefix}\n")
                try:
                    out = self._scripts.run_on(servers[name], "nibbles", [], args)
                except (redis.ConnectionError, redis.TimeoutError):
                    if isinstance(client, RedisCluster):
                        # A master lost: the cluster client's own path (the pipeline) meets the
                        # error, marks the node and reads the slot map again (the promoted replica).
                        return None
                    raise
                except redis.ResponseError as exc:
                    # A Redis that cannot load the script (before 7.0: no script flags) never
                    # will; anything else (a slot moving, a demoted master answering READONLY, a
                    # key not local) is the pipeline's to meet, with the cluster client's
                    # redirections: this time only.
                    if any(word in str(exc).lower() for word in ("shebang", "compiling", "flag")):
                        self._batched = False
                        log.warning("balance store: nibbles run one script each from now on (a batch was "
                                    "refused: %s; Redis 7.0 or later runs them in one)", exc)
                    return None
                for i, reply in zip(chunk, out, strict=True):
                    replies[i] = [text(v) for v in reply]
        return replies

    def _pipelined_nibble_replies(self, items: Sequence[tuple[NibbleRequest, str]]) -> list[list[str]]:
        def build(pipe: Any) -> None:
            for r, account_id in items:
                ak = self._keys.of(account_id)
                self._scripts.call(pipe, "nibble",
                                   [ak.account, ak.live, ak.call(r.call_id), ak.periods, ak.periods_unposted],
                                   [r.call_id, r.seq, r.debit_micros, r.reserve_micros, r.now_ms, r.ttl_ms,
                                    r.bundle_used_s, r.bundle_want_s, ak.period_prefix, ak.spend_prefix])

        if not items:
            return []
        return [[text(v) for v in reply] for reply in self._execute(build)]

    # ------------------------------------------------------------------ settle, release

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, *,
               account_id: str | None = None, bundle: BundleSettle | None = None) -> SettleOutcome:
        check_call_id(call_id)
        check_micros("cost", cost_micros)
        slots = [] if bundle is None else _check_bundle_seconds(bundle.slots, bundle.covered_s)
        covered = "" if bundle is None else str(bundle.covered_s)
        with _unavailable("settle"):
            resolved = self._accounts_of([call_id], [account_id])[0]
            if resolved is None:
                raise UnknownCall(f"settle of unknown call {call_id!r}: no reservation and no account to charge")
            ak = self._keys.of(resolved)
            keys = self._step_keys(ak, call_id)
            args = [call_id, resolved, seq, cost_micros, now_ms, ak.period_prefix, covered, ak.spend_prefix, *slots]
            member = self._keys.member(resolved, call_id)

            def run() -> list[Any]:
                # The sweeper's entry is due only after the ledger post had its chance (it must
                # exist even for a call the store lost: a settle without reservation).
                return [text(v) for v in self._execute(lambda p: (
                    p.zadd(self._keys.index_of(resolved), {member: now_ms + RETRY_PENDING_MS}),
                    self._scripts.call(p, "settle", keys, args)))[1]]

            reply = self._with_account(resolved, run)
            status = SettleStatus(reply[0])
            record = record_from(reply, 2)
            if status is SettleStatus.CONFLICT:
                log.error("settle conflict call=%s stored_cost=%s new_cost=%d: nothing changed", call_id,
                          record.fields.get("cost"), cost_micros)
            elif status is SettleStatus.WITHOUT_RESERVATION:
                log.warning("settle without reservation call=%s account=%s cost_micros=%d: charged in full",
                            call_id, resolved, cost_micros)
            posted: bool | None = record.posted
            if posted:
                self._forget(resolved, call_id)
            else:
                posted = self._post_closed(resolved, call_id, record, now_ms)
            return SettleOutcome(call_id, resolved, status, record.number("cost"), record.number("debited"),
                                 int(reply[1]), record.number("overrun"), ledger_posted=bool(posted),
                                 bundle_used_s=record.number("b_used"))

    def release(self, call_id: str, seq: int, now_ms: int, *, account_id: str | None = None) -> ReleaseOutcome:
        check_call_id(call_id)
        with _unavailable("release"):
            resolved = self._accounts_of([call_id], [account_id])[0]
            if resolved is None:
                return ReleaseOutcome(call_id, ReleaseStatus.UNKNOWN_CALL)
            reply = self._with_account(resolved, lambda: self._close(resolved, call_id, "released", seq, now_ms))
            if reply[0] == "unknown_call":
                self._forget(resolved, call_id)
                return ReleaseOutcome(call_id, ReleaseStatus.UNKNOWN_CALL)
            record = record_from(reply, 2)
            if not record.posted:
                self._post_closed(resolved, call_id, record, now_ms)
            elif record.state != "open":
                self._forget(resolved, call_id)
            return ReleaseOutcome(call_id, ReleaseStatus(reply[0]), int(reply[1]),
                                  record.optional_int("closed_charge") or 0)

    def _close(self, account_id: str, call_id: str, mode: str, seq: int, now_ms: int) -> list[str]:
        ak = self._keys.of(account_id)
        member = self._keys.member(account_id, call_id)
        return [text(v) for v in self._execute(lambda p: (
            p.zadd(self._keys.index_of(account_id), {member: now_ms}, nx=True),
            self._scripts.call(p, "close", self._step_keys(ak, call_id),
                               [call_id, mode, seq, now_ms, self._retention_ms, ak.period_prefix,
                                ak.spend_prefix])))[1]]

    # ------------------------------------------------------------------ the sweeper

    def expire(self, now_ms: int, *, limit: int = 1000) -> ExpireReport:
        """Release reservations past their TTL (their debits become the call's charge) and write
        the ledger entries of closed calls that are not in SQL yet. Safe on many nodes at once."""
        with _unavailable("expire"):
            rebuilt = self._watch_replication()
            due = self._index_members(now_ms, limit)
            expired: list[str] = []
            posted = pending = 0
            for member in due:
                account_id, call_id = self._keys.split(member)
                if call_id == PERIODS_MARK:
                    if self._poster is not None:
                        self._poster.submit(member, partial(self._post_openings, account_id, member, now_ms))
                        pending += 1
                    elif not self._post_openings(account_id, member, now_ms):
                        pending += 1
                    continue
                try:
                    reply = self._with_account(account_id,
                                               partial(self._close, account_id, call_id, "expired", 0, now_ms))
                except NotFound:  # an account deleted from SQL: nothing left to post
                    reply = ["unknown_call"]
                status = reply[0]
                if status == "alive":
                    self._client.zadd(self._keys.index_of(account_id), {member: int(reply[1])}, xx=True)
                    continue
                if status in ("unknown_call", "noacct"):
                    self._forget(account_id, call_id)
                    continue
                record = record_from(reply, 2)
                if status == "released":
                    log.warning("reservation expired call=%s account=%s released_micros=%s charged_micros=%s",
                                call_id, account_id, reply[1], record.fields.get("closed_charge"))
                    expired.append(call_id)
                if record.posted:
                    self._forget(account_id, call_id)
                    continue
                done = self._post_closed(account_id, call_id, record, now_ms)
                if done:
                    posted += 1
                else:
                    pending += 1
            return ExpireReport(tuple(expired), posted, pending, rebuilt)

    # ------------------------------------------------------------------ after a failover

    def _watch_replication(self) -> int:
        """Rebuild from the SQL ledger the accounts a new master may hold stale; returns how many
        were rebuilt here or queued for the poster.

        Redis replication is asynchronous: a replica promoted after its master died (cluster
        failover, Sentinel), or a Redis restarted from an older dump, can miss the master's last
        writes. What the ledger has is safe (ledger.py orders Redis first, SQL second, and
        ``post_call`` lets the ledger win when a lost settle or expiry comes back), but a lost
        top-up, status change or settle leaves the account's Redis balance off until a rebuild.

        A promoted replica or a restarted server has a new replication id (``master_replid``).
        Each sweep reads each master's (one ``INFO`` per master) and compares it with the marker
        the sweeps keep on that master (``KeySpace.replication_marker``: the id they last saw
        there and when). The marker is data like any other: a replica holds the copy its master
        replicated, a dump holds the one it was taken with. So a new id is noticed by the first
        sweep of any node, also one started after the promotion. For that master's slots, the
        accounts whose SQL row changed since ``REBUILD_LOOKBACK_MS`` before the marker's instant
        are rebuilt (a top-up, a posting, a status or limit change all touch
        ``accounts.updated_at``). One node does it per new id (a claim key); each rebuild is
        atomic under the account's SQL row lock and exact while calls run. No marker (a new
        deployment, a server restarted empty: every account loads from SQL anyway): it is
        written, nothing rebuilt. A rebuild does not bring back a live call's lost nibble: its
        settle charges the call its full cost from what is still reserved and debited."""
        read_ms = int(time.time() * 1000)
        queued = 0
        for replid, slots in self._replication_ids():
            if not replid:
                continue  # a master that did not answer: compared again once one serves its slots
            first = slots[0] if slots is not None else None
            marker = self._keys.replication_marker(first)
            seen_id, _, seen_ms = str(self._client.get(marker) or "").partition(" ")
            if not seen_ms.isdigit():  # no marker, or one this code did not write: noted afresh below
                seen_id = ""
            if seen_id and seen_id != replid:
                queued += self._rebuild_after(replid, slots, int(seen_ms) - REBUILD_LOOKBACK_MS, read_ms)
            # Written after the rebuild was claimed (or found claimed): a sweep that failed before
            # (SQL away) leaves the old id, and the next sweep tries again.
            self._client.set(marker, f"{replid} {read_ms}", px=MARKER_KEEP_MS)
        return queued

    def _rebuild_after(self, replid: str, slots: list[int] | None, since_ms: int, read_ms: int) -> int:
        # SQL first: if it fails, nothing is claimed or noted, and the next sweep tries again.
        accounts = self._accounts_changed_since(since_ms, set(slots) if slots is not None else None)
        claim = self._keys.rebuild_claim(replid, slots[0] if slots is not None else None)
        if not self._client.set(claim, str(read_ms), nx=True, px=REBUILD_LOOKBACK_MS):
            log.info("balance store: a master's replication id changed to %s; another node rebuilds its accounts",
                     replid)
            return 0
        log.warning("balance store: the master of %d slot(s) has a new replication id %s (a replica promoted, "
                    "or a restart): %d accounts changed in SQL since %s are rebuilt from the ledger",
                    len(slots) if slots is not None else SLOTS, replid, len(accounts),
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(0, since_ms) / 1000)))
        for account_id in accounts:
            if self._poster is not None:
                self._poster.submit(f"rebuild:{account_id}", partial(self._rebuild_cached, account_id))
            else:
                self._rebuild_cached(account_id)
        return len(accounts)

    def _replication_ids(self) -> list[tuple[str, list[int] | None]]:
        """Each master's ``master_replid`` ("" where it did not answer) and the slots it serves
        (None: the one server)."""
        if not isinstance(self._client, RedisCluster):
            try:
                return [(self._replid_of(self._client.info("replication")), None)]
            except redis.ResponseError as exc:  # INFO renamed or refused (some managed Redis): no watch
                self._info_refused(exc)
                return []
        found: list[tuple[str, list[int] | None]] = []
        for node, slots in _masters(self._client).values():
            try:
                found.append((self._replid_of(self._client.info("replication", target_nodes=node)), sorted(slots)))
            except redis.ResponseError as exc:  # INFO refused (renamed): that master is not watched
                self._info_refused(exc, f" by {node.name}")
            except (redis.RedisError, RedisClusterException):
                continue  # a dead master: its slots are compared again once another serves them
        return found

    def _info_refused(self, exc: Exception, where: str = "") -> None:
        if not self._replids_refused:
            log.warning("balance store: INFO replication refused%s (%s): a failover there will not be noticed; "
                        "run `billing-agent accounts rebuild-cache` after one", where, exc)
            self._replids_refused = True

    @staticmethod
    def _replid_of(info: Any) -> str:
        if isinstance(info, dict) and "master_replid" not in info and len(info) == 1:
            info = next(iter(info.values()))  # a cluster client's answer keyed by node
        return str(info.get("master_replid", "")) if isinstance(info, dict) else ""

    def _accounts_changed_since(self, since_ms: int, slots: set[int] | None) -> list[str]:
        since = datetime.fromtimestamp(max(0, since_ms) / 1000, UTC)
        with self._sessions() as session:
            ids = [str(i) for i in session.scalars(select(Account.id).where(Account.updated_at >= since))]
        if slots is None:
            return ids
        return [a for a in ids if key_slot(self._keys.of(a).account.encode()) in slots]

    def _rebuild_cached(self, account_id: str) -> bool:
        """Rebuild an account Redis holds (one it does not hold is loaded by its next call)."""
        try:
            status = self._rebuild(account_id, "if_present")
        except (redis.RedisError, RedisClusterException, SQLAlchemyError, BillingError) as exc:
            log.error("account=%s not rebuilt after a Redis failover (run `billing-agent accounts rebuild-cache "
                      "%s`): %s", account_id, account_id, exc)
            return False
        if status == "loaded":
            log.info("account=%s rebuilt from the ledger after a Redis failover", account_id)
        return True

    def _post_openings(self, account_id: str, member: str, now_ms: int) -> bool:
        """Write the account's bundle period openings SQL does not have yet. The index entry goes
        only once none is left (checked after removing it: an authorize that opens one adds the
        entry again after its script)."""
        index = self._keys.index_of(account_id)
        if not post_openings(self._client, self._scripts, self._keys, self._sessions, account_id):
            self._client.zadd(index, {member: now_ms + RETRY_PENDING_MS})
            return False
        self._client.zrem(index, member)
        if self._client.scard(self._keys.of(account_id).periods_unposted):
            self._client.zadd(index, {member: now_ms})
        return True

    def _index_members(self, max_score: int | str, limit: int | None) -> list[str]:
        """Members of the sweeper's index due by ``max_score`` ('+inf': all), at most ``limit``."""
        if not self._keys.per_slot_index:
            return [text(m) for m in self._client.zrangebyscore(self._keys.index, "-inf", max_score, start=0,
                                                                  num=limit if limit is not None else -1)]
        return self._cluster_index_members(max_score, limit if limit is not None else 2**31)

    def _cluster_index_members(self, max_score: int | str, limit: int) -> list[str]:
        """The per-slot indexes of a cluster (keys.py), read master by master with one script per
        SWEEP_SLOTS slots. A master that does not answer (dead, failover under way) is skipped
        until the next sweep: the others' calls are still swept. Masters are taken in turn from a
        different one each time, so a ``limit`` reached early does not starve the last ones."""
        client = self._client
        assert isinstance(client, RedisCluster)
        masters = sorted(_masters(client).values(), key=lambda entry: entry[0].name)
        self._sweep_turn += 1
        if masters:
            turn = self._sweep_turn % len(masters)
            masters = masters[turn:] + masters[:turn]
        found: list[str] = []
        try:  # the single index of earlier versions: read until drained, never written
            found += [text(m) for m in client.zrangebyscore(self._keys.index, "-inf", max_score, start=0, num=limit)]
        except redis.RedisError as exc:
            log.debug("sweep: the former single index is not readable now: %s", exc)
        if self._slot_indexes is None:
            self._slot_indexes = [self._keys.slot_index(slot) for slot in range(SLOTS)]
        for node, slots in masters:
            server = client.get_redis_connection(node)
            try:
                for at in range(0, len(slots), SWEEP_SLOTS):
                    if len(found) >= limit:
                        return found
                    keys = [self._slot_indexes[slot] for slot in slots[at:at + SWEEP_SLOTS]]
                    found += [text(m) for m in self._scripts.run_on(server, "sweep", [],
                                                                     [max_score, limit - len(found), *keys])]
            except redis.RedisError as exc:
                log.warning("sweep: cluster master %s skipped this time: %s", node.name, exc)
                if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                    client.nodes_manager.initialize()  # slots moved (a failover, resharding): read the map again
        return found

    # ------------------------------------------------------------------ views and maintenance

    def live_calls(self) -> list[LiveCall]:
        with _unavailable("live calls"):
            members = [split for m in self._index_members("+inf", None)
                       if (split := self._keys.split(m))[1] != PERIODS_MARK]
            hashes = self._execute(lambda p: [p.hgetall(self._keys.of(a).call(c)) for a, c in members])
        calls = []
        for (account_id, call_id), raw in zip(members, hashes, strict=True):
            fields = {text(k): text(v) for k, v in raw.items()}
            if fields.get("state") != "open":
                continue
            r = CallRecord(fields)
            calls.append(LiveCall(account_id, call_id, fields.get("node", ""), r.number("seq"), r.number("reserved"),
                                  r.number("debited"), r.number("overrun"), r.number("created"), r.number("expires"),
                                  r.number("b_held"), r.number("b_used")))
        return sorted(calls, key=lambda c: c.created_ms)

    def account_state(self, account_id: str) -> AccountState:
        ak = self._keys.of(account_id)
        fields = ("balance", "credit", "reserved", "status", "max_calls", "plan", "currency", "overrun")
        with _unavailable("account state"):
            for _ in (1, 2):
                values, live = self._execute(lambda p: (p.hmget(ak.account, fields), p.zcard(ak.live)))
                if values[3] is not None:
                    v = [text(x) if x is not None else "" for x in values]
                    max_calls = int(v[4] or 0)
                    return AccountState(account_id, v[3], int(v[0]), int(v[2]), int(v[1]),
                                        max_calls or None, int(live), v[5], v[6], int(v[7] or 0))
                self._rebuild(account_id, "if_absent")
        raise NotFound(f"account {account_id!r} could not be loaded into Redis")

    def bundle_periods(self, account_id: str) -> dict[tuple[int, int], PeriodState]:
        """The account's bundle periods as Redis holds them (loaded from SQL when the account is
        not cached): granted and used as Redis sees them, reserved by live calls."""
        ak = self._keys.of(account_id)

        def run() -> list[Any]:
            return [text(v) for v in self._scripts.run(self._client, "periods", [ak.account, ak.periods],
                                                       [ak.period_prefix])]

        with _unavailable("bundle periods"):
            try:
                reply = self._with_account(account_id, run)
            except NotFound:
                return {}
        if reply[0] != "ok":
            return {}
        return {parse_period_id(reply[at]): PeriodState(int(reply[at + 1]), int(reply[at + 2]), int(reply[at + 3]))
                for at in range(1, len(reply), 4)}

    def spend_counters(self, account_id: str, periods: SpendPeriods) -> dict[str, tuple[int, int]]:
        """The live spend counters of a day and a month of the account ('day', 'month' -> spent,
        held; zeros for a counter Redis does not have), in one round trip, after loading the
        account from SQL if Redis lost it (its counters come with it). For ``limits show``: with
        this store SQL's ``spend_periods`` has what posted calls spent, and no held."""
        ak = self._keys.of(account_id)
        with _unavailable("spend counters"):
            for _ in (1, 2):
                exists, day, month = self._execute(lambda p: (
                    p.exists(ak.account), p.hmget(ak.spend("day", periods.day_start_ms), "spent", "held"),
                    p.hmget(ak.spend("month", periods.month_start_ms), "spent", "held")))
                if exists:
                    return {kind: (int(text(v[0] or 0)), int(text(v[1] or 0))) for kind, v in
                            (("day", day), ("month", month))}
                self._rebuild(account_id, "if_absent")
        raise NotFound(f"account {account_id!r} could not be loaded into Redis")

    def _rebuild(self, account_id: str, mode: str) -> str:
        return rebuild_account(self._client, self._scripts, self._keys, self._sessions, account_id, mode,
                               self._retention_ms)

    def rebuild(self, account_id: str) -> AccountState:
        """Recompute the account from the SQL ledger (after a Redis restart, failover or repair)."""
        with _unavailable("rebuild"):
            self._scripts.ensure_loaded(self._client)
            self._rebuild(account_id, "load")
        return self.account_state(account_id)

    def refresh(self, account_id: str) -> bool:
        """Bring a cached account up to date with SQL (after a top-up, a status change); an
        account not in Redis is left for the next call to load. True if it was cached."""
        with _unavailable("refresh"):
            self._scripts.ensure_loaded(self._client)
            return self._rebuild(account_id, "if_present") == "loaded"

    def shard_of(self, account_id: str) -> str:
        """On a cluster, the master that serves the account's slot now (the client's slot map,
        read again after a failover); "" on one Redis."""
        if not isinstance(self._client, RedisCluster):
            return ""
        slot = key_slot(self._keys.of(account_id).account.encode())
        slot_nodes = self._client.nodes_manager.slots_cache.get(slot)
        return slot_nodes[0].name if slot_nodes else ""  # not covered: the calls' own error says so

    def close(self) -> None:
        if self._poster is not None:
            self._poster.stop()
        self._client.close()


class _Ride:
    """A ``StoreRider`` (agent/ports.py) on one store call: offered a place in the pipeline until
    it has been answered once, never again (the call's own reruns, NOSCRIPT or an account
    loaded from SQL, leave it out: a fraud observe counted twice would count the call twice)."""

    __slots__ = ("_rider",)

    def __init__(self, rider: StoreRider | None) -> None:
        self._rider = rider  # None: nothing rides (or no longer)

    def board(self, client: object, pipe: Any) -> bool:
        return self._rider is not None and self._rider.queue(client, pipe)

    def answer(self, reply: object) -> None:
        rider, self._rider = self._rider, None
        if rider is not None:
            rider.answer(reply)
