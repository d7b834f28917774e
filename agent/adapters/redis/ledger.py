"""Between the Redis cache and the SQL ledger (the truth): posting closed calls, loading accounts.

Ordering that keeps them equal:

* A closed call is first committed in Redis (balance adjusted, call marked ``posted=0`` in the
  account's unposted set), then its ledger entries are written in SQL (idempotent per
  reference), then Redis is told (``mark_posted``, guarded by the call's version). A crash in
  between leaves the call in the unposted set and in the sweeper's index: it is posted later.
* An account is (re)loaded under its SQL row lock, so no ledger entry of that account commits
  meanwhile; the script adds back what live and unposted calls took in Redis and the ledger
  does not hold yet (see rebuild.lua).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.adapters.redis.connect import RedisClient
from agent.adapters.redis.keys import KeySpace
from agent.adapters.redis.scripts import Scripts
from agent.adapters.sql.accounts import lock_account, post_entry
from agent.adapters.sql.engine import transaction
from agent.adapters.sql.models import LedgerEntry, RatePlan
from agent.core.balance import MAX_STORE_MICROS, ledger_postings
from agent.core.errors import BillingError, InvalidInput
from agent.core.money import format_amount

log = logging.getLogger(__name__)

SQL_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call hash as a script returned it."""

    fields: dict[str, str]

    def number(self, name: str) -> int:
        value = self.fields.get(name)
        return int(value) if value not in (None, "") else 0

    def optional_int(self, name: str) -> int | None:
        value = self.fields.get(name)
        return int(value) if value not in (None, "") else None

    @property
    def state(self) -> str:
        return self.fields.get("state", "")

    @property
    def posted(self) -> bool:
        return self.fields.get("posted", "1") == "1"


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_from(reply: list[object], start: int) -> CallRecord:
    items = [text(v) for v in reply[start:]]
    return CallRecord(dict(zip(items[0::2], items[1::2], strict=True)))


def post_call(client: RedisClient, scripts: Scripts, keys: KeySpace, sessions: sessionmaker[Session],
              account_id: str, call_id: str, record: CallRecord, retention_ms: int) -> bool:
    """Write a closed call's ledger entries, then mark it posted. False: SQL refused, retry later."""
    postings = ledger_postings(call_id, closed_charge_micros=record.optional_int("closed_charge"),
                               cost_micros=record.optional_int("cost"))
    try:
        with transaction(sessions) as session:
            for p in postings:
                post_entry(session, account_id, kind=p.kind, amount_micros=p.amount_micros, reference=p.reference,
                           call_id=call_id, description=p.description)
    except (SQLAlchemyError, BillingError) as exc:
        log.error("ledger write of call=%s account=%s failed, kept for the sweeper: %s", call_id, account_id, exc)
        return False
    ak = keys.of(account_id)
    try:
        scripts.run(client, "mark_posted", [ak.call(call_id), ak.unposted],
                     [call_id, record.fields.get("ver", "1"), retention_ms])
    except redis.RedisError as exc:  # the ledger has it; a later sweep marks it (posting is idempotent)
        log.warning("call=%s is in the ledger but Redis was not told: %s", call_id, exc)
    return True


def _ledger_sums(session: Session, account_id: str, call_ids: Iterable[str]) -> dict[str, int]:
    ids = sorted(call_ids)
    sums: dict[str, int] = {}
    for start in range(0, len(ids), SQL_IN_CHUNK):
        chunk = ids[start:start + SQL_IN_CHUNK]
        rows = session.execute(
            select(LedgerEntry.call_id, func.sum(LedgerEntry.amount_micros))
            .where(LedgerEntry.account_id == account_id, LedgerEntry.call_id.in_(chunk))
            .group_by(LedgerEntry.call_id))
        sums.update({str(call_id): int(total) for call_id, total in rows})
    return sums


def check_redis_range(account_id: str, balance_micros: int, credit_limit_micros: int) -> None:
    """Redis scripts compute in Lua numbers, doubles: integers are exact only up to 2**53
    micro-units (9,007,199,254.740991 units; a balance in VND or IDR can pass it). An account
    beyond that is refused by name rather than loaded rounded (SQL …980001 read back …980000)."""
    for what, value in (("balance", balance_micros), ("credit limit", credit_limit_micros)):
        if abs(value) > MAX_STORE_MICROS:
            raise InvalidInput(
                f"account {account_id!r}: {what} {format_amount(value)} exceeds what the Redis balance store holds "
                f"exactly ({format_amount(MAX_STORE_MICROS)}; Lua numbers are doubles): use the SQL balance "
                "store for this account's currency, or keep amounts below that")


def rebuild_account(client: RedisClient, scripts: Scripts, keys: KeySpace, sessions: sessionmaker[Session],
                    account_id: str, mode: str) -> str:
    """Load (``if_absent``), refresh (``if_present``) or rebuild (``load``) one account from SQL.

    Returns the script's status (loaded, kept, absent); raises NotFound for an unknown account.
    """
    ak = keys.of(account_id)
    with transaction(sessions) as session:
        account = lock_account(session, account_id)
        check_redis_range(account_id, account.balance_micros, account.credit_limit_micros)
        plan = session.get(RatePlan, account.rate_plan_id)
        pipe = client.pipeline(transaction=False)
        pipe.zrange(ak.live, 0, -1)
        pipe.smembers(ak.unposted)
        live, unposted = pipe.execute()
        tracked = {text(c) for c in live} | {text(c) for c in unposted}
        sums = _ledger_sums(session, account_id, tracked)
        args: list[object] = [
            mode, account.balance_micros, account.credit_limit_micros, account.status,
            account.max_concurrent_calls or 0, plan.name if plan is not None else "", account.currency,
            time.time_ns() // 1_000_000, ak.call_prefix,
        ]
        for call_id, total in sums.items():
            args += [call_id, total]
        reply = scripts.run(client, "rebuild", [ak.account, ak.live, ak.unposted], args)
    status = text(reply[0])
    if status == "loaded":
        log.info("account=%s %s into Redis from the ledger: balance_micros=%s reserved_micros=%s", account_id,
                 "rebuilt" if mode == "load" else "loaded", text(reply[1]), text(reply[2]))
    return status
