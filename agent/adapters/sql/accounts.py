"""Accounts and the append-only ledger (DESIGN §5, §6).

Every balance change is one row in ``ledger_entries`` with a unique reference, inserted in the
same transaction that moves ``accounts.balance_micros`` under a row lock, so the cached balance
always equals the sum of the ledger. Replaying a reference never posts twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from agent.adapters.sql.models import Account, LedgerEntry, RatePlan, Tenant, utcnow
from agent.core.balance import LedgerPosting
from agent.core.budgets import SpendLimits, check_limits
from agent.core.errors import Conflict, InvalidInput, NotFound
from agent.core.fx import check_currency

ACCOUNT_TYPES = ("prepaid", "postpaid")
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class AccountView:
    id: str
    tenant: str
    plan: str
    currency: str
    account_type: str
    status: str
    balance_micros: int
    reserved_micros: int
    credit_limit_micros: int
    max_concurrent_calls: int | None
    created_at: datetime
    suspended_by_rule: str | None = None  # the fraud rule that suspended the account
    suspended_at: datetime | None = None
    limits: SpendLimits = SpendLimits()  # spend caps (DESIGN §8)

    @property
    def available_micros(self) -> int:
        return self.balance_micros + self.credit_limit_micros - self.reserved_micros


@dataclass(frozen=True)
class Posting:
    """The outcome of a ledger posting: the entry, and whether this call created it."""

    entry_id: int
    account_id: str
    kind: str
    amount_micros: int
    balance_after_micros: int
    reference: str
    created: bool


def _validate_account_id(account_id: str) -> None:
    if not account_id or len(account_id) > 64 or not account_id.isprintable() or account_id != account_id.strip():
        raise InvalidInput(
            f"account id {account_id!r} must be 1-64 printable characters without surrounding spaces"
        )


def get_plan(session: Session, name: str) -> RatePlan:
    plan = session.scalar(select(RatePlan).where(RatePlan.name == name))
    if plan is None:
        raise NotFound(f"unknown rate plan {name!r}")
    if plan.carrier_id is not None:
        raise InvalidInput(f"rate plan {name!r} is a carrier's buy deck, not a plan accounts can be rated on")
    return plan


def ensure_tenant(session: Session, name: str = DEFAULT_TENANT) -> Tenant:
    """The tenant ``name``: the operator's root is made on first use, any other must exist
    (``billing-agent tenants create``, DESIGN §11)."""
    from agent.adapters.sql.tenants import tenant_of

    return tenant_of(session, name)


def lock_account(session: Session, account_id: str) -> Account:
    """Load an account under a row lock (SQLite: the BEGIN IMMEDIATE write lock)."""
    account = session.scalar(select(Account).where(Account.id == account_id).with_for_update())
    if account is None:
        raise NotFound(f"unknown account {account_id!r}")
    return account


def create_account(
    session: Session,
    account_id: str,
    *,
    plan: str,
    currency: str | None = None,
    balance_micros: int = 0,
    credit_limit_micros: int = 0,
    account_type: str | None = None,
    max_concurrent_calls: int | None = None,
    tenant: str = DEFAULT_TENANT,
) -> AccountView:
    _validate_account_id(account_id)
    if balance_micros < 0:
        raise InvalidInput("an opening balance must not be negative (use a credit limit)")
    if credit_limit_micros < 0:
        raise InvalidInput("a credit limit must not be negative")
    if max_concurrent_calls is not None and max_concurrent_calls < 1:
        raise InvalidInput(f"max concurrent calls {max_concurrent_calls} must be at least 1")
    kind = account_type or ("postpaid" if credit_limit_micros > 0 else "prepaid")
    if kind not in ACCOUNT_TYPES:
        raise InvalidInput(f"account type {kind!r} must be prepaid or postpaid")
    if kind == "prepaid" and credit_limit_micros:
        raise InvalidInput("a prepaid account has no credit limit (use --type postpaid)")
    rate_plan = get_plan(session, plan)
    from agent.adapters.sql.tenants import check_plan_of_tenant

    owner = ensure_tenant(session, tenant)
    check_plan_of_tenant(session, rate_plan, owner, f"account {account_id!r} of tenant {tenant!r}")
    # An account may pay in another currency than its plan's: its calls are converted at the FX
    # rate in force at their start (DESIGN §11; no rate: refused with no_fx_rate).
    cur = check_currency(currency or rate_plan.currency)
    if session.get(Account, account_id) is not None:
        raise Conflict(f"account {account_id!r} already exists")
    now = utcnow()
    account = Account(
        id=account_id,
        tenant_id=owner.id,
        rate_plan_id=rate_plan.id,
        currency=cur,
        account_type=kind,
        status="active",
        credit_limit_micros=credit_limit_micros,
        balance_micros=0,
        reserved_micros=0,
        max_concurrent_calls=max_concurrent_calls,
        created_at=now,
        updated_at=now,
    )
    session.add(account)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"account {account_id!r} already exists") from None
    if balance_micros:
        post_entry(session, account_id, kind="opening", amount_micros=balance_micros,
                   reference=f"opening:{account_id}", description="opening balance")
    return view_account(session, account_id)


def post_entry(
    session: Session,
    account_id: str,
    *,
    kind: str,
    amount_micros: int,
    reference: str,
    call_id: str | None = None,
    description: str = "",
) -> Posting:
    """Append one ledger entry and move the cached balance, idempotently per reference.

    A reference already in the ledger returns the stored entry with ``created=False``; if that
    entry differs in account, kind or amount the call is refused, since the same reference must
    always mean the same money movement.
    """
    account = lock_account(session, account_id)
    existing = session.scalar(select(LedgerEntry).where(LedgerEntry.reference == reference))
    if existing is not None:
        if (existing.account_id, existing.kind, existing.amount_micros) != (account_id, kind, amount_micros):
            raise Conflict(
                f"reference {reference!r} was already used for a {existing.kind} of "
                f"{existing.amount_micros} micro-units on account {existing.account_id!r}"
            )
        return Posting(existing.id, account_id, kind, amount_micros, existing.balance_after_micros,
                       reference, created=False)
    account.balance_micros += amount_micros
    account.updated_at = utcnow()
    entry = LedgerEntry(
        account_id=account_id,
        kind=kind,
        amount_micros=amount_micros,
        balance_after_micros=account.balance_micros,
        reference=reference,
        call_id=call_id,
        description=description[:255],
        created_at=account.updated_at,
    )
    session.add(entry)
    session.flush()
    return Posting(entry.id, account_id, kind, amount_micros, entry.balance_after_micros, reference,
                   created=True)


_ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
_LEDGER: Table = LedgerEntry.__table__  # type: ignore[assignment]
# Shared with the SQL balance store (balance_store.py): an account's balance under its row lock,
# and a move of the money it holds for live calls.
LOCK_BALANCE = select(_ACCOUNTS.c.balance_micros).where(_ACCOUNTS.c.id == bindparam("account_id")).with_for_update()
HOLD_ON_ACCOUNT = (update(_ACCOUNTS).where(_ACCOUNTS.c.id == bindparam("account_id"))
                   .values(reserved_micros=_ACCOUNTS.c.reserved_micros + bindparam("delta")))
_ENTRIES_OF = select(_LEDGER.c.reference, _LEDGER.c.account_id, _LEDGER.c.kind, _LEDGER.c.amount_micros).where(
    _LEDGER.c.reference.in_(bindparam("references", expanding=True)))
_MOVE_ACCOUNT = (update(_ACCOUNTS).where(_ACCOUNTS.c.id == bindparam("account_id"))
                 .values(balance_micros=_ACCOUNTS.c.balance_micros + bindparam("amount"),
                         reserved_micros=_ACCOUNTS.c.reserved_micros + bindparam("held"),
                         updated_at=bindparam("updated_at")))
_ENTRY_OF = select(_LEDGER.c.reference, _LEDGER.c.account_id, _LEDGER.c.kind, _LEDGER.c.amount_micros).where(
    _LEDGER.c.reference == bindparam("reference"))  # the usual close: one posting
_INSERT_ENTRY = insert(_LEDGER)


class StatementRunner(Protocol):
    """How a caller runs this module's Core statements (the SQL store on SQLite: on the driver's
    cursor, agent/adapters/sql/driver_statements.py); ``first()`` and ``scalar()`` of the result."""

    def __call__(self, session: Session | None, statement: Executable, params: dict[str, Any]) -> Any: ...


def _session_execute(session: Session | None, statement: Executable, params: dict[str, Any]) -> Any:
    if session is None:
        raise ValueError("post_entries without a session needs the caller's statement runner")
    return session.execute(statement, params)


def post_entries(session: Session | None, account_id: str, postings: Sequence[LedgerPosting], *, call_id: str,
                 held_delta_micros: int = 0, locked_balance_micros: int | None = None,
                 execute: StatementRunner = _session_execute) -> list[bool]:
    """``post_entry`` for a closed call's entries, as Core statements: every call closes once,
    and the balance stores close calls on the daemon's busy path (the SQL store in its loop, the
    Redis store's ledger poster beside it), where loading and flushing entities cost several
    times the statements. The account is locked (unless the caller holds its lock and passes
    its balance), the references looked up: one the ledger holds with the same movement is kept
    (not created), with another one refused (Conflict), as ``post_entry`` does; then the new
    entries are inserted with their balances after, and the account's balance (and the money it
    holds for live calls, ``held_delta_micros``: the SQL store's) moved in one update.
    Returns, per posting, whether this call created it. ``execute`` runs the single-row
    statements (the SQL store passes its own on SQLite); without a ``session`` (the SQL store's
    raw SQLite transaction) only one posting can be made."""
    balance = locked_balance_micros
    if balance is None:
        balance = execute(session, LOCK_BALANCE, {"account_id": account_id}).scalar()
        if balance is None:
            raise NotFound(f"unknown account {account_id!r}")
    stored: dict[str, Any] = {}
    if len(postings) == 1:
        found = execute(session, _ENTRY_OF, {"reference": postings[0].reference}).first()
        if found is not None:
            stored[found.reference] = found
    elif postings:
        if session is None:
            raise ValueError(f"{len(postings)} postings need a session")
        stored = {row.reference: row for row in session.execute(
            _ENTRIES_OF, {"references": [p.reference for p in postings]})}
    created, entries, moved = [], [], 0
    now = utcnow()
    for p in postings:
        row = stored.get(p.reference)
        if row is not None:
            if (row.account_id, row.kind, row.amount_micros) != (account_id, p.kind, p.amount_micros):
                raise Conflict(f"reference {p.reference!r} was already used for a {row.kind} of "
                               f"{row.amount_micros} micro-units on account {row.account_id!r}")
            created.append(False)
            continue
        balance += p.amount_micros
        moved += p.amount_micros
        entries.append({"account_id": account_id, "kind": p.kind, "amount_micros": p.amount_micros,
                        "balance_after_micros": balance, "reference": p.reference, "call_id": call_id,
                        "description": p.description[:255], "created_at": now})
        created.append(True)
    if entries:
        execute(session, _MOVE_ACCOUNT, {"account_id": account_id, "amount": moved, "held": held_delta_micros,
                                         "updated_at": now})
        if len(entries) == 1:
            execute(session, _INSERT_ENTRY, entries[0])
        else:
            assert session is not None  # several postings: refused above without one
            session.execute(_INSERT_ENTRY, entries)
    elif held_delta_micros:
        execute(session, HOLD_ON_ACCOUNT, {"account_id": account_id, "delta": held_delta_micros})
    return created


def topup(session: Session, account_id: str, amount_micros: int, reference: str | None = None) -> Posting:
    if amount_micros <= 0:
        raise InvalidInput("a top-up must be greater than zero")
    ref = reference if reference is not None else uuid.uuid4().hex
    if not ref.strip() or len(ref) > 128:
        raise InvalidInput(f"reference {reference!r} must be 1-128 characters")
    return post_entry(session, account_id, kind="topup", amount_micros=amount_micros,
                      reference=f"topup:{account_id}:{ref}", description=f"top-up {ref}")


def adjust(session: Session, account_id: str, amount_micros: int, *, reason: str,
           reference: str | None = None) -> Posting:
    if amount_micros == 0:
        raise InvalidInput("an adjustment of zero changes nothing")
    if not reason.strip():
        raise InvalidInput("an adjustment needs a reason")
    ref = reference if reference is not None else uuid.uuid4().hex
    return post_entry(session, account_id, kind="adjustment", amount_micros=amount_micros,
                      reference=f"adjust:{account_id}:{ref}", description=reason)


def set_status(session: Session, account_id: str, status: str) -> AccountView:
    if status not in ("active", "suspended", "closed"):
        raise InvalidInput(f"status {status!r} must be active, suspended or closed")
    account = lock_account(session, account_id)
    account.status = status
    account.updated_at = utcnow()
    if status != "suspended":  # resumed (or closed): no longer suspended by a fraud rule
        account.suspended_by_rule = None
        account.suspended_at = None
    session.flush()
    return view_account(session, account_id)


_KEEP = object()


def set_limits(session: Session, account_id: str, *, max_call_cost_micros: int | None | object = _KEEP,
               daily_micros: int | None | object = _KEEP, monthly_micros: int | None | object = _KEEP,
               ) -> AccountView:
    """Set or clear (None) an account's spend caps; a cap not given keeps its value. The caps
    apply to calls authorized from now on (a call in progress keeps the day and month it counts
    on; ``max_call_cost`` binds at its next nibble)."""
    account = lock_account(session, account_id)
    current = SpendLimits(account.max_call_cost_micros, account.daily_spend_micros, account.monthly_spend_micros)
    wanted = SpendLimits(
        current.max_call_cost_micros if max_call_cost_micros is _KEEP else max_call_cost_micros,  # type: ignore[arg-type]
        current.daily_micros if daily_micros is _KEEP else daily_micros,  # type: ignore[arg-type]
        current.monthly_micros if monthly_micros is _KEEP else monthly_micros)  # type: ignore[arg-type]
    check_limits(wanted)
    account.max_call_cost_micros = wanted.max_call_cost_micros
    account.daily_spend_micros = wanted.daily_micros
    account.monthly_spend_micros = wanted.monthly_micros
    account.updated_at = utcnow()
    session.flush()
    return view_account(session, account_id)


def _view(account: Account, tenant: str, plan: str) -> AccountView:
    return AccountView(
        id=account.id, tenant=tenant, plan=plan, currency=account.currency,
        account_type=account.account_type, status=account.status,
        balance_micros=account.balance_micros, reserved_micros=account.reserved_micros,
        credit_limit_micros=account.credit_limit_micros,
        max_concurrent_calls=account.max_concurrent_calls, created_at=account.created_at,
        suspended_by_rule=account.suspended_by_rule, suspended_at=account.suspended_at,
        limits=SpendLimits(account.max_call_cost_micros, account.daily_spend_micros, account.monthly_spend_micros),
    )


def _view_query() -> Any:
    return (
        select(Account, Tenant.name, RatePlan.name)
        .join(Tenant, Tenant.id == Account.tenant_id)
        .join(RatePlan, RatePlan.id == Account.rate_plan_id)
    )


def view_account(session: Session, account_id: str) -> AccountView:
    row = session.execute(_view_query().where(Account.id == account_id)).first()
    if row is None:
        raise NotFound(f"unknown account {account_id!r}")
    return _view(row[0], row[1], row[2])


def list_accounts(session: Session, *, status: str | None = None, plan: str | None = None,
                  limit: int | None = None, tenant_ids: tuple[int, ...] | None = None) -> list[AccountView]:
    query = _view_query().order_by(Account.id)
    if tenant_ids is not None:  # a tenant's subtree (DESIGN §11)
        query = query.where(Account.tenant_id.in_(tenant_ids))
    if status:
        query = query.where(Account.status == status)
    if plan:
        query = query.where(RatePlan.name == plan)
    if limit:
        query = query.limit(limit)
    return [_view(a, t, p) for a, t, p in session.execute(query)]


def ledger_sums(session: Session) -> dict[str, int]:
    """Sum of ledger amounts per account (accounts with no entry are absent)."""
    rows = session.execute(
        select(LedgerEntry.account_id, func.coalesce(func.sum(LedgerEntry.amount_micros), 0))
        .group_by(LedgerEntry.account_id)
    )
    return {account_id: int(total) for account_id, total in rows}
