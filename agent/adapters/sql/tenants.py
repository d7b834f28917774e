"""The tenant tree (DESIGN §11): the operator's root, resellers and sub-resellers, 4 levels at most.

* The operator's root is the tenant ``default`` (level 1, no parent; made on first use). A tenant
  made without a parent by an older version is a root too.
* ``create_tenant`` makes a reseller tenant under its parent **and its own account in the parent
  tenant**, named ``tenant:NAME`` (:func:`reseller_account_id`): the reseller pays its parent
  from that account (prepaid, or postpaid with a credit limit), rated on one of the parent's
  plans. ``tenants.account_id`` points at it.
* A plan belongs to a tenant (``rate_plans.tenant_id``; NULL: the operator's, i.e. any root's):
  an account may only be rated on a plan of its own tenant.

How a call's chain is found (for derived charging): the customer account's ``tenant_id`` gives
its tenant T; while T has a parent, ``T.account_id`` is the account T pays its parent with, on
that account's own plan (a plan of the parent), and the next level is ``T.parent_id``.
:func:`chain_of` returns exactly that list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.adapters.sql.models import Account, RatePlan, Tenant, utcnow
from agent.core.errors import Conflict, InvalidInput, NotFound
from agent.core.fx import check_currency

ROOT_TENANT = "default"  # the operator's (level 1); DEFAULT_TENANT of accounts.py
MAX_LEVELS = 4  # the operator's root is level 1: operator > reseller > sub-reseller > sub-sub-reseller
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def reseller_account_id(name: str) -> str:
    """The account a reseller tenant pays its parent with (it lives in the parent tenant)."""
    return f"tenant:{name}"


@dataclass(frozen=True)
class TenantView:
    id: int
    name: str
    parent: str | None
    level: int
    currency: str
    account_id: str | None  # its own account, in the parent tenant (None for a root)
    created_at: datetime
    balance_micros: int | None = None  # of account_id
    credit_limit_micros: int | None = None
    account_currency: str | None = None
    accounts: int = 0  # accounts of this tenant (its customers, and its sub-resellers' own accounts)
    plans: tuple[str, ...] = ()
    children: tuple[TenantView, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class ChainLevel:
    """One level above a customer: ``tenant`` pays ``parent`` through ``account_id`` (rated on
    ``plan``, a plan of the parent, in ``currency``)."""

    tenant: str
    parent: str
    account_id: str
    plan: str
    currency: str


class Tree:
    """Every tenant, read once (a tree has few nodes): levels, subtrees, chains."""

    def __init__(self, session: Session) -> None:
        self.by_id: dict[int, Tenant] = {t.id: t for t in session.scalars(select(Tenant))}
        self.by_name: dict[str, Tenant] = {t.name: t for t in self.by_id.values()}

    def get(self, name: str, what: str = "tenant") -> Tenant:
        tenant = self.by_name.get(name)
        if tenant is None:
            known = ", ".join(sorted(self.by_name)[:10]) or "none yet"
            raise NotFound(f"unknown {what} {name!r} (tenants: {known})")
        return tenant

    def ancestors(self, tenant: Tenant) -> list[Tenant]:
        """From the parent up to the root; a cycle in the stored rows (never made by this code) is an error."""
        seen = {tenant.id}
        found: list[Tenant] = []
        current = tenant
        while current.parent_id is not None:
            parent = self.by_id[current.parent_id]
            if parent.id in seen:
                raise Conflict(f"tenant {tenant.name!r}: its parents form a cycle through {parent.name!r}")
            seen.add(parent.id)
            found.append(parent)
            current = parent
        return found

    def level(self, tenant: Tenant) -> int:
        return 1 + len(self.ancestors(tenant))

    def children(self, tenant: Tenant) -> list[Tenant]:
        return sorted((t for t in self.by_id.values() if t.parent_id == tenant.id), key=lambda t: t.name)

    def subtree(self, tenant: Tenant) -> list[Tenant]:
        """``tenant`` and every tenant below it, parents before children."""
        found = [tenant]
        for item in found:
            found.extend(self.children(item))
        return found

    def height(self, tenant: Tenant) -> int:
        """Levels of the subtree under and including ``tenant`` (1: no children)."""
        return 1 + max((self.height(child) for child in self.children(tenant)), default=0)


def ensure_root(session: Session, currency: str = "EUR") -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == ROOT_TENANT))
    if tenant is None:
        tenant = Tenant(name=ROOT_TENANT, currency=check_currency(currency), created_at=utcnow())
        session.add(tenant)
        session.flush()
    return tenant


def tenant_of(session: Session, name: str, *, default_currency: str = "EUR") -> Tenant:
    """An existing tenant by name (the operator's root is made on first use)."""
    if name == ROOT_TENANT:
        return ensure_root(session, default_currency)
    return Tree(session).get(name)


def subtree_ids(session: Session, name: str) -> tuple[int, ...]:
    """The ids of ``name`` and of every tenant below it (``--tenant`` of the read commands)."""
    if name == ROOT_TENANT:
        ensure_root(session)
    tree = Tree(session)
    return tuple(t.id for t in tree.subtree(tree.get(name)))


def plan_belongs_to(plan: RatePlan, tenant: Tenant) -> bool:
    """A plan with no tenant is the operator's: it belongs to any root (level 1) tenant."""
    return plan.tenant_id == tenant.id or (plan.tenant_id is None and tenant.parent_id is None)


def plan_owner_name(session: Session, plan: RatePlan) -> str:
    """The tenant a plan belongs to, quoted for a message: ``'acme'``, ``'default' (the operator's)``."""
    if plan.tenant_id is None:
        return f"{ROOT_TENANT!r} (the operator's)"
    owner = session.get(Tenant, plan.tenant_id)
    return repr(owner.name) if owner is not None else f"#{plan.tenant_id}"


def check_plan_of_tenant(session: Session, plan: RatePlan, tenant: Tenant, who: str) -> None:
    """Refuse a plan of another tenant, naming both."""
    if not plan_belongs_to(plan, tenant):
        raise InvalidInput(f"{who}: plan {plan.name!r} belongs to tenant {plan_owner_name(session, plan)}, not "
                           f"to tenant {tenant.name!r} (an account is rated on a plan of its own tenant)")


def _check_name(name: str) -> None:
    if not TENANT_NAME.match(name):
        raise InvalidInput(f"tenant name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")


def _check_depth(tree: Tree, parent: Tenant, height: int, name: str) -> None:
    levels = tree.level(parent) + height
    if levels > MAX_LEVELS:
        path = " > ".join(t.name for t in [*reversed(tree.ancestors(parent)), parent])
        raise InvalidInput(f"tenant {name!r} under {path} would make level {levels}: a tree has at most "
                           f"{MAX_LEVELS} levels (the operator's root is level 1)")


def create_tenant(session: Session, name: str, *, parent: str, currency: str | None = None,
                  plan: str | None = None, balance_micros: int = 0, credit_limit_micros: int = 0,
                  default_currency: str = "EUR") -> TenantView:
    """A reseller tenant under ``parent`` and its account ``tenant:NAME`` in ``parent``."""
    from agent.adapters.sql.accounts import create_account

    _check_name(name)
    if name == parent:
        raise InvalidInput(f"tenant {name!r} cannot be its own parent (a cycle)")
    parent_tenant = tenant_of(session, parent, default_currency=default_currency) if parent == ROOT_TENANT \
        else Tree(session).get(parent, "parent tenant")
    tree = Tree(session)
    if name in tree.by_name:
        raise Conflict(f"tenant {name!r} already exists (under {_parent_name(tree, tree.by_name[name])})")
    _check_depth(tree, parent_tenant, 1, name)
    cur = check_currency(currency or parent_tenant.currency, "--currency")
    account_id = reseller_account_id(name)
    if session.get(Account, account_id) is not None:
        raise Conflict(f"account {account_id!r} (the account tenant {name!r} would pay its parent with) already "
                       "exists")
    rate_plan = _parent_plan(session, parent_tenant, plan, name)
    tenant = Tenant(name=name, parent_id=parent_tenant.id, currency=cur, account_id=account_id, created_at=utcnow())
    session.add(tenant)
    session.flush()
    create_account(session, account_id, plan=rate_plan.name, currency=cur, balance_micros=balance_micros,
                   credit_limit_micros=credit_limit_micros, tenant=parent_tenant.name)
    return view_tenant(session, name)


def _parent_name(tree: Tree, tenant: Tenant) -> str:
    return tree.by_id[tenant.parent_id].name if tenant.parent_id is not None else "no parent: a root"


def _parent_plan(session: Session, parent: Tenant, plan: str | None, name: str) -> RatePlan:
    """The parent's plan the reseller buys on: the one named, else the parent's only plan."""
    owned = [p for p in session.scalars(select(RatePlan).where(RatePlan.carrier_id.is_(None)).order_by(RatePlan.name))
             if plan_belongs_to(p, parent)]
    if plan is not None:
        found = session.scalar(select(RatePlan).where(RatePlan.name == plan))
        if found is None:
            raise NotFound(f"unknown rate plan {plan!r}")
        check_plan_of_tenant(session, found, parent, f"tenant {name!r} buys from {parent.name!r}")
        return found
    if len(owned) == 1:
        return owned[0]
    names = ", ".join(p.name for p in owned) or "none yet"
    raise InvalidInput(f"tenant {name!r}: give --plan, the plan of {parent.name!r} its account is rated on "
                       f"({parent.name}'s plans: {names})")


def move_tenant(session: Session, name: str, *, parent: str, plan: str | None = None) -> TenantView:
    """Give ``name`` another parent; refuses a cycle and a fifth level. Its own account follows
    it into the new parent, rated on ``plan`` (a plan of the new parent; default: its only plan)."""
    tree = Tree(session)
    tenant = tree.get(name)
    new_parent = tree.get(parent, "parent tenant")
    if new_parent.id == tenant.id or tenant in tree.ancestors(new_parent):
        path = " > ".join(t.name for t in [*reversed(tree.ancestors(new_parent)), new_parent])
        raise InvalidInput(f"tenant {name!r} under {parent!r} would make a cycle ({path} > {name}): {parent!r} "
                           f"is {name!r} itself or below it")
    _check_depth(tree, new_parent, tree.height(tenant), name)
    if tenant.account_id is None:
        raise InvalidInput(f"tenant {name!r} has no account to pay a parent with (a root): it cannot be moved")
    rate_plan = _parent_plan(session, new_parent, plan, name)
    account = session.get(Account, tenant.account_id, with_for_update=True)
    if account is None:
        raise NotFound(f"tenant {name!r}: its account {tenant.account_id!r} does not exist")
    tenant.parent_id = new_parent.id
    account.tenant_id = new_parent.id
    account.rate_plan_id = rate_plan.id
    account.updated_at = utcnow()
    session.flush()
    return view_tenant(session, name)


def _views(session: Session, tree: Tree, tenants: Iterable[Tenant], *, with_children: bool) -> list[TenantView]:
    tenants = list(tenants)
    ids = [t.id for t in tenants]
    own_accounts = {a.id: a for a in session.scalars(
        select(Account).where(Account.id.in_([t.account_id for t in tenants if t.account_id])))}
    counts: dict[int, int] = {}
    for tenant_id in session.scalars(select(Account.tenant_id).where(Account.tenant_id.in_(ids))):
        counts[tenant_id] = counts.get(tenant_id, 0) + 1
    plans: dict[int | None, list[str]] = {}
    for plan in session.scalars(select(RatePlan).where(RatePlan.carrier_id.is_(None)).order_by(RatePlan.name)):
        plans.setdefault(plan.tenant_id, []).append(plan.name)
    views = []
    for t in tenants:
        account = own_accounts.get(t.account_id or "")
        owned = plans.get(t.id, []) + (plans.get(None, []) if t.parent_id is None else [])
        children = tuple(_views(session, tree, tree.children(t), with_children=True)) if with_children else ()
        views.append(TenantView(
            t.id, t.name, _parent_name(tree, t) if t.parent_id is not None else None, tree.level(t), t.currency,
            t.account_id, t.created_at, account.balance_micros if account else None,
            account.credit_limit_micros if account else None, account.currency if account else None,
            counts.get(t.id, 0), tuple(owned), children))
    return views


def view_tenant(session: Session, name: str, *, tree: bool = False) -> TenantView:
    if name == ROOT_TENANT:
        ensure_root(session)
    t = Tree(session)
    return _views(session, t, [t.get(name)], with_children=tree)[0]


def list_tenants(session: Session, *, under: str | None = None) -> list[TenantView]:
    """Every tenant (or ``under``'s subtree), parents before children."""
    if under == ROOT_TENANT or not session.scalar(select(Tenant.id).limit(1)):
        ensure_root(session)
    tree = Tree(session)
    if under is not None:
        ordered = tree.subtree(tree.get(under))
    else:
        ordered = []
        for root in sorted((t for t in tree.by_id.values() if t.parent_id is None), key=lambda t: t.name):
            ordered.extend(_depth_first(tree, root))
    return _views(session, tree, ordered, with_children=False)


def _depth_first(tree: Tree, tenant: Tenant) -> list[Tenant]:
    found = [tenant]
    for child in tree.children(tenant):
        found.extend(_depth_first(tree, child))
    return found


def chain_of(session: Session, account_id: str) -> list[ChainLevel]:
    """The levels above a customer account, nearest first: each reseller tenant, the parent it
    pays, and the account and plan it pays with. Empty for an account of a root tenant."""
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"unknown account {account_id!r}")
    tree = Tree(session)
    levels: list[ChainLevel] = []
    tenant = tree.by_id[account.tenant_id]
    for parent in tree.ancestors(tenant):
        if tenant.account_id is None:
            raise Conflict(f"tenant {tenant.name!r} has a parent but no account to pay it with")
        own = session.get(Account, tenant.account_id)
        if own is None:
            raise NotFound(f"tenant {tenant.name!r}: its account {tenant.account_id!r} does not exist")
        plan = session.get(RatePlan, own.rate_plan_id)
        assert plan is not None
        levels.append(ChainLevel(tenant.name, parent.name, own.id, plan.name, own.currency))
        tenant = parent
    return levels
