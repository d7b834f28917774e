"""The failure policy around a balance store: a deadline per call, and what to do without it.

``StoreGuard`` is itself a ``BalanceStore`` (agent/ports.py) wrapping the real one:

* Every call runs under a deadline (``billing.store_timeout_ms``, a ``gevent.Timeout``; the
  Redis client's own socket timeout also bounds it where sockets are not cooperative). A
  failure opens a circuit for ``probe_interval_ms``: meanwhile calls fail at once instead of
  each waiting for the deadline, then one call probes the store again.
* ``fail_closed`` (default): authorize is denied with reason ``store_unavailable``; nibbles get
  no grant, so the charger cuts live calls at the end of the slice they already hold.
* ``fail_open``: authorize and nibbles are granted from an offline credit of at most
  ``billing.offline_credit`` per account (per agent process) while the store is unreachable.
  The account's status and concurrent-call limit cannot be checked meanwhile.
* Either way nothing is lost: a nibble, settle or release the store did not take is written to
  a local journal (a JSON-lines file, fsynced, or memory when no path is given) and replayed in
  order, idempotently per ``(call_id, seq)``, by ``recover()`` (the daemon calls it every
  sweep) or before the next batch once the store answers again. A call authorized offline is
  authorized for real first (its reservation starts at zero, so its offline debits show as
  overrun), and its settle is charged to the account every step names.
* A store in several pieces (a Redis Cluster's masters: ``BalanceStore.shard_of``) has a circuit
  per piece, and a batch is split by piece, each part under its own deadline, at the same time.
  Journaled steps wait only for their own piece: a shard's kept entries are replayed in order
  when it answers, and meanwhile that shard's new steps are journaled behind them, while the
  other masters' accounts go on. With one master killed, before this, every call of every
  node was cut for the 2-5 s of the failover (bench_nodes.py --kill-master-at).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import gevent
import gevent.lock

from agent.config import BillingConfig
from agent.core.balance import (
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
    bundle_settle_from_json,
    bundle_settle_to_json,
)
from agent.core.bundles import BundleSlot, PeriodState
from agent.core.errors import BillingError
from agent.core.money import parse_amount
from agent.ports import BalanceStore, Clock, StoreRider

log = logging.getLogger(__name__)

T = TypeVar("T")
MAINTENANCE_TIMEOUT_S = 5.0  # the sweeper's and the listings' deadline (see StoreGuard._maintenance)
Policy = Literal["fail_closed", "fail_open"]


class Journal:
    """Steps the store has not taken yet, in order.

    With a path, each ``append`` is one ``O_APPEND`` write (in the kernel when it returns: it
    survives ``kill -9`` of the agent) and the file is fsynced in groups, off the hub, by
    ``sync`` (the daemon runs it in gevent's thread pool every ``SYNC_INTERVAL_S``, as the CDR
    spool does): during an outage every nibble is journaled, and an fsync per nibble on the
    hub stalled the whole process exactly when it was most loaded."""

    SYNC_INTERVAL_S = 0.1

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: list[dict[str, Any]] = []
        self._fd: int | None = None
        self._dirty = False
        self.syncs = 0
        if path is not None and path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    self._entries.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a crash mid-write
                    log.error("%s:%d: unreadable journal line skipped: %r", path, number, line[:200])

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def append(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)
        if self.path is not None:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
            self._dirty = True

    def sync(self, fsync: Callable[[int], None] = os.fsync) -> None:
        """Make what was appended durable (a power loss keeps it); cheap when nothing was."""
        if self._fd is None or not self._dirty:
            return
        self._dirty = False
        fsync(self._fd)
        self.syncs += 1

    def drop_first(self, count: int) -> None:
        if count > 0:
            self.replace_head(count, [])

    def replace_head(self, count: int, kept: list[dict[str, Any]]) -> None:
        """The first ``count`` entries become ``kept`` (those not applied, in order); entries
        appended after them stay behind."""
        if count <= 0 and not kept:
            return
        self._entries = kept + self._entries[count:]
        if self.path is not None:
            self.close()
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in self._entries)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._dirty:
                os.fsync(fd)
                self._dirty = False
            os.close(fd)


class StoreGuard:
    """Implements ``BalanceStore`` around another store, adding deadlines and the policy."""

    def __init__(self, store: BalanceStore, *, clock: Clock, policy: Policy = "fail_closed",
                 timeout_ms: int = 250, offline_credit_micros: int = 0, journal: Journal | None = None,
                 probe_interval_ms: int = 1000) -> None:
        if policy not in ("fail_closed", "fail_open"):
            raise ValueError(f"failure policy {policy!r} must be fail_closed or fail_open")
        self.store = store
        self.clock = clock
        self.policy = policy
        self.timeout_s = timeout_ms / 1000
        self.offline_credit_micros = offline_credit_micros
        self.journal = journal if journal is not None else Journal()
        self.probe_interval_ms = probe_interval_ms
        self._retry_at_ms: dict[str, int] = {}  # shard -> its circuit is open until then
        self._tripped_by: dict[str, str] = {}  # shard -> an account whose step opened its circuit
        # shard -> journal entries kept for it: its new steps are journaled behind them
        self._pending: dict[str, int] = {}
        self._offline_used: dict[str, int] = {}  # account -> offline money granted
        # Calls authorized offline, not in the store yet (their account rides with every step:
        # the guard keeps no call -> account map of its own).
        self._offline_calls: dict[str, tuple[str, str]] = {}  # call -> (account, node)
        self._replaying = gevent.lock.Semaphore()  # one journal replay at a time (see _replay)
        self.replayed_steps = 0  # journaled steps taken (or refused for good) since start
        self._count_pending()  # a journal left by an earlier run

    @property
    def available(self) -> bool:
        """No part of the store is known to be down."""
        return not self.down_shards()

    def down_shards(self) -> list[str]:
        """The parts of the store whose circuit is open ("" for a store in one piece)."""
        self._forget_replaced()
        return sorted(self._retry_at_ms)

    def _forget_replaced(self) -> None:
        """A dead master's circuit is closed once its accounts are served by another master (its
        replica, promoted): no step will name the dead one again to close it."""
        for shard, account in list(self._tripped_by.items()):
            heir = self._shard(account)
            if shard and heir != shard:
                self._retry_at_ms.pop(shard, None)
                self._tripped_by.pop(shard, None)
                log.warning("balance store%s answers again (its slots are served by %s now); %d journaled steps "
                            "to replay", _named(shard), heir or "another master", self._pending.get(heir, 0))

    def shard_of(self, account_id: str) -> str:
        return self.store.shard_of(account_id)

    def _shard(self, account_id: str | None) -> str:
        return self.store.shard_of(account_id) if account_id else ""

    # ------------------------------------------------------------------ the deadline and circuits

    def _attempt(self, what: str, shard: str, work: Callable[[], T], account: str | None = None) -> T:
        retry_at = self._retry_at_ms.get(shard)
        if retry_at is not None and self.clock.monotonic_ms() < retry_at:
            raise StoreUnavailable(f"balance store{_named(shard)} unavailable ({what} not tried: circuit open)")
        timer = gevent.Timeout(self.timeout_s)
        timer.start()
        try:
            result = work()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            self._trip(what, shard, f"no answer within {self.timeout_s * 1000:.0f} ms", account)
            raise StoreUnavailable(f"balance store{_named(shard)} did not answer {what} within "
                                   f"{self.timeout_s * 1000:.0f} ms") from None
        except StoreUnavailable as exc:
            self._trip(what, shard, str(exc), account)
            raise
        finally:
            timer.close()
        if self._tripped_by:
            self._forget_replaced()
        if self._retry_at_ms.pop(shard, None) is not None:
            self._tripped_by.pop(shard, None)
            log.warning("balance store%s answers again (%s); %d journaled steps to replay", _named(shard), what,
                        self._pending.get(shard, 0))
        return result

    def _trip(self, what: str, shard: str, reason: str, account: str | None) -> None:
        if account:
            self._tripped_by[shard] = account
        if shard not in self._retry_at_ms:
            log.error("balance store%s unavailable during %s: %s; policy %s", _named(shard), what, reason,
                      self.policy)
        self._retry_at_ms[shard] = self.clock.monotonic_ms() + self.probe_interval_ms

    def _per_shard(self, what: str, works: dict[str, tuple[Callable[[], T], str | None]]) -> dict[str, T]:
        """Each shard's part under its own deadline and circuit, the parts at the same time (a
        hung master then costs its own part the deadline, not the others). The shards that did
        not answer are missing from the result."""
        done: dict[str, T] = {}

        def run(shard: str, work: Callable[[], T], account: str | None) -> None:
            try:
                done[shard] = self._attempt(what, shard, work, account)
            except StoreUnavailable:
                pass

        if len(works) == 1:
            (shard, (work, account)), = works.items()
            run(shard, work, account)
            return done
        parts = [gevent.spawn(run, shard, work, account) for shard, (work, account) in works.items()]
        try:
            # Each part has its own deadline: this one only guards against a part that never ends.
            gevent.joinall(parts, timeout=self.timeout_s * 2 + 1)
            for part in parts:
                if part.ready():
                    part.get()  # anything but StoreUnavailable (bad input, a bug) is the caller's
        finally:
            gevent.killall([part for part in parts if not part.ready()], block=False)
        return done

    # ------------------------------------------------------------------ authorize

    def authorize(self, account_id: str, call_id: str, node: str, want_micros: int, min_micros: int,
                  now_ms: int, ttl_ms: int, *, bundle_slots: Sequence[BundleSlot] = (),
                  bundle_want_s: int = 0, rider: StoreRider | None = None) -> AuthorizeOutcome:
        # An open circuit or a passed deadline leaves ``rider`` unanswered: its owner makes its own trip.
        try:
            outcome = self._attempt("authorize", self._shard(account_id), lambda: self.store.authorize(
                account_id, call_id, node, want_micros, min_micros, now_ms, ttl_ms, bundle_slots=bundle_slots,
                bundle_want_s=bundle_want_s, rider=rider), account_id)
        except StoreUnavailable:
            # Offline (fail_open) grants are money only: bundle seconds are shared by every node
            # and cannot be counted without the store.
            return self._authorize_offline(account_id, call_id, node, want_micros, min_micros, now_ms, ttl_ms)
        return outcome

    def authorize_many(self, steps: Sequence[AuthorizeStep], *,
                       rider: StoreRider | None = None) -> list[AuthorizeOutcome]:
        """One part per shard, each under its deadline; a step whose shard does not answer is
        as ``authorize`` would be offline. ``rider`` goes with the first step's part (the
        customer's: the fraud counters' keys share its slot)."""
        groups = _group([self._shard(st.account_id) for st in steps])
        answers = self._per_shard("authorize", {
            shard: (partial(self.store.authorize_many, [steps[i] for i in indexes],
                            rider=rider if indexes[0] == 0 else None), steps[indexes[0]].account_id)
            for shard, indexes in groups.items()})
        outcomes: list[AuthorizeOutcome | None] = [None] * len(steps)
        for shard, indexes in groups.items():
            answer = answers.get(shard)
            for n, i in enumerate(indexes):
                st = steps[i]
                outcomes[i] = answer[n] if answer is not None else self._authorize_offline(
                    st.account_id, st.call_id, st.node, st.want_micros, st.min_micros, st.now_ms, st.ttl_ms)
        return [o for o in outcomes if o is not None]

    def _authorize_offline(self, account_id: str, call_id: str, node: str, want: int, minimum: int, now_ms: int,
                           ttl_ms: int) -> AuthorizeOutcome:
        if call_id in self._offline_calls:  # a replay while still offline
            return AuthorizeOutcome(call_id, True, None, 0, self._offline_left(account_id), replayed=True)
        left = self._offline_left(account_id)
        if self.policy == "fail_closed" or left <= 0 or left < minimum:
            return AuthorizeOutcome(call_id, False, DenyReason.STORE_UNAVAILABLE, 0, 0)
        granted = min(want, left)
        self._offline_used[account_id] = self._offline_used.get(account_id, 0) + granted
        self._offline_calls[call_id] = (account_id, node)
        self._journal({"op": "authorize", "account_id": account_id, "call_id": call_id, "node": node,
                       "now_ms": now_ms, "ttl_ms": ttl_ms})
        log.warning("offline grant call=%s account=%s granted_micros=%d offline_left_micros=%d", call_id,
                    account_id, granted, left - granted)
        return AuthorizeOutcome(call_id, True, None, granted, left)

    def _offline_left(self, account_id: str) -> int:
        return self.offline_credit_micros - self._offline_used.get(account_id, 0)

    # ------------------------------------------------------------------ nibbles

    def debit_and_reserve(self, call_id: str, seq: int, debit_micros: int, reserve_micros: int,
                          now_ms: int, ttl_ms: int, *, account_id: str | None = None) -> NibbleOutcome:
        return self.debit_and_reserve_many(
            [NibbleRequest(call_id, seq, debit_micros, reserve_micros, now_ms, ttl_ms, account_id)])[0]

    def debit_and_reserve_many(self, requests: Sequence[NibbleRequest]) -> list[NibbleOutcome]:
        """One part per shard. A shard with journaled steps left (down, or a call of it
        authorized offline) journals its part behind them, so that each call's steps reach the
        store in seq order."""
        hinted = [r if r.account_id is not None or r.call_id not in self._offline_calls
                  else _with_account(r, self._offline_calls[r.call_id][0]) for r in requests]
        groups = _group([self._shard(r.account_id) for r in hinted])
        waiting = self._journal_waits(groups)
        answers = self._per_shard("nibble", {
            shard: (partial(self.store.debit_and_reserve_many, [hinted[i] for i in indexes]),
                    hinted[indexes[0]].account_id)
            for shard, indexes in groups.items() if shard not in waiting})
        outcomes: list[NibbleOutcome | None] = [None] * len(hinted)
        for shard, indexes in groups.items():
            answer = answers.get(shard)
            for n, i in enumerate(indexes):
                outcomes[i] = answer[n] if answer is not None else self._nibble_offline(hinted[i])
        return [o for o in outcomes if o is not None]

    def _nibble_offline(self, r: NibbleRequest) -> NibbleOutcome:
        self._journal({"op": "nibble", "call_id": r.call_id, "seq": r.seq, "debit_micros": r.debit_micros,
                       "reserve_micros": r.reserve_micros, "now_ms": r.now_ms, "ttl_ms": r.ttl_ms,
                       "account_id": r.account_id, "bundle_used_s": r.bundle_used_s})
        account_id = r.account_id
        if self.policy == "fail_closed" or account_id is None:
            return NibbleOutcome(r.call_id, r.seq, NibbleStatus.STORE_UNAVAILABLE, 0, 0)
        granted = max(0, min(r.reserve_micros, self._offline_left(account_id)))
        self._offline_used[account_id] = self._offline_used.get(account_id, 0) + granted
        return NibbleOutcome(r.call_id, r.seq, NibbleStatus.OFFLINE, granted, r.debit_micros)

    # ------------------------------------------------------------------ settle, release

    def settle(self, call_id: str, seq: int, cost_micros: int, now_ms: int, *,
               account_id: str | None = None, bundle: BundleSettle | None = None) -> SettleOutcome:
        account = account_id or self._offline_account(call_id)
        shard = self._shard(account)
        try:
            if self._journal_waits({shard: []}):
                raise StoreUnavailable("journal not replayed yet")
            outcome = self._attempt("settle", shard, lambda: self.store.settle(
                call_id, seq, cost_micros, now_ms, account_id=account, bundle=bundle), account)
        except StoreUnavailable:
            self._journal({"op": "settle", "call_id": call_id, "seq": seq, "cost_micros": cost_micros,
                           "now_ms": now_ms, "account_id": account,
                           "bundle": None if bundle is None else bundle_settle_to_json(bundle)})
            log.warning("settle journaled call=%s account=%s cost_micros=%d", call_id, account, cost_micros)
            return SettleOutcome(call_id, account or "", SettleStatus.JOURNALED, cost_micros, ledger_posted=False)
        return outcome

    def release(self, call_id: str, seq: int, now_ms: int, *, account_id: str | None = None) -> ReleaseOutcome:
        account = account_id or self._offline_account(call_id)
        shard = self._shard(account)
        try:
            if self._journal_waits({shard: []}):
                raise StoreUnavailable("journal not replayed yet")
            outcome = self._attempt("release", shard, lambda: self.store.release(call_id, seq, now_ms,
                                                                                 account_id=account), account)
        except StoreUnavailable:
            self._journal({"op": "release", "call_id": call_id, "seq": seq, "now_ms": now_ms,
                           "account_id": account})
            return ReleaseOutcome(call_id, ReleaseStatus.JOURNALED)
        return outcome

    def _offline_account(self, call_id: str) -> str | None:
        offline = self._offline_calls.get(call_id)
        return offline[0] if offline is not None else None

    # ------------------------------------------------------------------ the journal

    def _journal(self, entry: dict[str, Any]) -> None:
        self.journal.append(entry)
        shard = self._shard(entry.get("account_id"))
        self._pending[shard] = self._pending.get(shard, 0) + 1

    def _count_pending(self) -> None:
        """Journal entries by shard, as the store's shards are now (a failover moves accounts to
        another master's name)."""
        pending: dict[str, int] = {}
        for entry in self.journal.entries():
            shard = self._shard(entry.get("account_id"))
            pending[shard] = pending.get(shard, 0) + 1
        self._pending = pending

    def _journal_waits(self, groups: dict[str, list[int]]) -> set[str]:
        """The shards among ``groups`` whose steps must still be journaled: those with entries
        left after a replay (tried here when one of them may answer)."""
        if not any(self._pending.get(shard) for shard in groups):
            return set()
        now = self.clock.monotonic_ms()
        if any(self._pending.get(shard) and self._retry_at_ms.get(shard, now) <= now for shard in groups):
            self._replay()
        return {shard for shard in groups if self._pending.get(shard)}

    def recover(self) -> int:
        """Replay what the journal holds, in order; returns how many steps the store took."""
        before = self.replayed_steps
        if len(self.journal):
            self._replay()
        # Not a difference of journal lengths: steps journaled during the replay would make it
        # negative ("-N journaled steps replayed" was logged).
        return self.replayed_steps - before

    def _replay(self) -> bool:
        """True once the journal's steps are in the store. A shard's steps stop at the first one
        it cannot take; the other shards' go on. One replay at a time: each takes the entries
        it applied out of the head of the journal, so two at once dropped a step journaled
        meanwhile, unapplied (a settle lost: its call never charged). Whoever finds a replay
        running waits for it (at most the deadline), then replays what is left."""
        if not self._replaying.acquire(timeout=self.timeout_s):
            return False
        try:
            return self._replay_locked()
        finally:
            self._replaying.release()

    def _replay_locked(self) -> bool:
        head = self.journal.entries()
        if not head:
            return True
        kept: list[dict[str, Any]] = []
        stopped: set[str] = set()  # shards that failed during this pass: their later entries wait
        done = 0
        try:
            for entry in head:
                shard = self._shard(entry.get("account_id"))
                if shard in stopped:
                    kept.append(entry)
                    continue
                try:
                    self._attempt("journal replay", shard, partial(self._apply, entry), entry.get("account_id"))
                except StoreUnavailable:
                    stopped.add(shard)
                    kept.append(entry)
                    continue
                except BillingError as exc:  # refused for good (unknown call, bad input): log, go on
                    log.error("journaled %s of call=%s refused by the store, dropped: %s", entry.get("op"),
                              entry.get("call_id"), exc)
                done += 1
        finally:
            # An exit half-way (a timeout from outside) keeps the entries not looked at yet.
            self.journal.replace_head(len(head), kept + head[len(kept) + done:])
            self.replayed_steps += done
            self._count_pending()
            self._forget_offline()
        if done:
            log.warning("journal replayed: %d steps%s", done,
                        f"; {len(kept)} wait for {', '.join(sorted(s or 'the store' for s in stopped))}"
                        if kept else "")
        return not kept

    def _forget_offline(self) -> None:
        """Offline grants whose steps are all in the store now are the store's to count."""
        self._offline_calls = {call: (account, node) for call, (account, node) in self._offline_calls.items()
                               if self._pending.get(self._shard(account))}
        self._offline_used = {account: used for account, used in self._offline_used.items()
                              if self._pending.get(self._shard(account))}

    def _apply(self, e: dict[str, Any]) -> None:
        now_ms = max(int(e["now_ms"]), self.clock.now_ms())  # a replayed step renews from now
        op, call_id = e["op"], str(e["call_id"])
        if op == "authorize":
            out = self.store.authorize(e["account_id"], call_id, e["node"], 0, 0, now_ms, int(e["ttl_ms"]))
            if not out.allowed:
                log.error("call=%s authorized offline is refused by the store (%s): its settle charges it in "
                          "full", call_id, out.reason)
        elif op == "nibble":
            self.store.debit_and_reserve_many([NibbleRequest(
                call_id, int(e["seq"]), int(e["debit_micros"]), int(e["reserve_micros"]), now_ms, int(e["ttl_ms"]),
                account_id=e.get("account_id"), bundle_used_s=int(e.get("bundle_used_s") or 0))])
        elif op == "settle":
            bundle = e.get("bundle")
            self.store.settle(call_id, int(e["seq"]), int(e["cost_micros"]), int(e["now_ms"]),
                              account_id=e.get("account_id"),
                              bundle=None if bundle is None else bundle_settle_from_json(bundle))
        elif op == "release":
            self.store.release(call_id, int(e["seq"]), int(e["now_ms"]), account_id=e.get("account_id"))
        else:
            log.error("unknown journal entry dropped: %r", e)

    # ------------------------------------------------------------------ pass-through

    def expire(self, now_ms: int, *, limit: int = 1000) -> ExpireReport:
        return self._maintenance("expire", lambda: self.store.expire(now_ms, limit=limit))

    def live_calls(self) -> list[LiveCall]:
        return self._maintenance("live calls", self.store.live_calls)

    def _maintenance(self, what: str, work: Callable[[], T]) -> T:
        """The sweeper's and the listings' steps: a deadline of their own (``MAINTENANCE_TIMEOUT_S``,
        or the store's if longer), and the circuit neither asked nor tripped. Under the calls'
        250 ms a Redis Cluster sweep (every slot's index, 43 ms at the median and 271 ms at worst
        on the loaded bench box) missed it, and the open circuit then refused and cut every call
        of the node for a second (bench_nodes.py: 77 of 132 circuit openings on a cluster)."""
        seconds = max(self.timeout_s, MAINTENANCE_TIMEOUT_S)
        try:
            with gevent.Timeout(seconds, StoreUnavailable(f"balance store did not finish {what} within "
                                                          f"{seconds * 1000:.0f} ms")):
                return work()
        except StoreUnavailable as exc:
            log.warning("balance store: %s failed: %s (calls are not affected)", what, exc)
            raise

    def bundle_periods(self, account_id: str) -> dict[tuple[int, int], PeriodState]:
        return self._attempt("bundle periods", self._shard(account_id),
                             lambda: self.store.bundle_periods(account_id), account_id)

    def account_state(self, account_id: str) -> AccountState:
        return self._attempt("account state", self._shard(account_id), lambda: self.store.account_state(account_id),
                             account_id)

    def close(self) -> None:
        self.journal.close()
        self.store.close()


def _named(shard: str) -> str:
    return f" (master {shard})" if shard else ""


def _group(shards: Sequence[str]) -> dict[str, list[int]]:
    """Indexes by shard, in order."""
    groups: dict[str, list[int]] = {}
    for index, shard in enumerate(shards):
        groups.setdefault(shard, []).append(index)
    return groups


def _with_account(r: NibbleRequest, account_id: str | None) -> NibbleRequest:
    return dataclasses.replace(r, account_id=account_id)


def guard_from_config(store: BalanceStore, billing: BillingConfig, clock: Clock,
                      journal_path: Path | None) -> StoreGuard:
    """The guard the daemon runs (journal: e.g. ``{cdr.spool_dir}/balance-journal.jsonl``)."""
    return StoreGuard(store, clock=clock, policy=billing.failure_policy, timeout_ms=billing.store_timeout_ms,
                      offline_credit_micros=parse_amount(billing.offline_credit, what="billing.offline_credit"),
                      journal=Journal(journal_path))
