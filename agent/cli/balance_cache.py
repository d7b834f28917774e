"""The balance store from the CLI: live reserved/available, Redis kept in step with the ledger.

With ``redis.url`` configured, Redis holds every node's reservations, so ``accounts show``
asks it for what is available; top-ups, adjustments and status changes are written to the SQL
ledger first and then pushed into Redis (the account is recomputed from the ledger, which is
exact even while calls run); ``accounts rebuild-cache`` recomputes accounts after a Redis
restart or failover. Without Redis the embedded store keeps everything in SQL: nothing to sync.
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy import select

from agent.adapters.redis.store import RedisBalanceStore, make_client
from agent.adapters.sql.engine import session_factory
from agent.adapters.sql.models import Account
from agent.cli.common import app, handle_errors, print_json
from agent.core.balance import AccountState, StoreUnavailable
from agent.core.budgets import SpendPeriods
from agent.core.bundles import PeriodState
from agent.core.errors import BillingError
from agent.core.money import format_amount


def redis_store(ctx: click.Context) -> RedisBalanceStore | None:
    context = app(ctx)
    redis = context.config.redis
    if not redis.url:
        return None
    return RedisBalanceStore(make_client(redis.url, redis.timeout_ms), session_factory(context.engine()),
                             key_prefix=redis.key_prefix)


def sync_account(ctx: click.Context, account_id: str) -> None:
    """Push a committed SQL change into Redis. The ledger already has it: a Redis that cannot be
    reached is a warning (run rebuild-cache later), never a reason to report the change failed."""
    store = redis_store(ctx)
    if store is None:
        return
    try:
        store.refresh(account_id)
    except StoreUnavailable as exc:
        click.echo(f"warning: the ledger has the change but Redis was not updated ({exc}); "
                   f"run `billing-agent accounts rebuild-cache {account_id}` once Redis is back", err=True)
    finally:
        store.close()


def live_state(ctx: click.Context, account_id: str) -> tuple[AccountState | None, str]:
    """The shared store's view of the account, and where it came from."""
    store = redis_store(ctx)
    if store is None:
        return None, "sql"
    try:
        return store.account_state(account_id), "redis"
    except StoreUnavailable as exc:
        click.echo(f"warning: Redis unavailable, reserved/available are the SQL database's ({exc})", err=True)
        return None, "sql (redis unavailable)"
    finally:
        store.close()


def store_bundle_periods(ctx: click.Context, account_id: str) -> tuple[dict[tuple[int, int], PeriodState] | None, str]:
    """The shared store's bundle periods of the account (granted, used, held by live calls on
    every node), and where they came from; None when the SQL ``bundle_periods`` table is the
    source (no Redis, or a Redis store that does not keep bundle periods, or Redis away)."""
    store = redis_store(ctx)
    if store is None:
        return None, "sql"
    try:
        return store.bundle_periods(account_id), "redis"
    except StoreUnavailable as exc:
        click.echo(f"warning: Redis unavailable, bundle figures are the SQL database's ({exc})", err=True)
        return None, "sql (redis unavailable)"
    finally:
        store.close()


def store_spend_counters(ctx: click.Context, account_id: str, periods: SpendPeriods
                         ) -> tuple[dict[str, tuple[int, int]] | None, str]:
    """The live spend counters (day, month -> spent, held by live calls on every node) of the
    account in Redis, and where they came from; None when SQL's ``spend_periods`` is the source
    (no Redis: the embedded store keeps them there, live holds included; or Redis away)."""
    store = redis_store(ctx)
    if store is None:
        return None, "sql"
    try:
        return store.spend_counters(account_id, periods), "redis"
    except StoreUnavailable as exc:
        click.echo(f"warning: Redis unavailable, spend figures are the SQL database's ({exc})", err=True)
        return None, "sql (redis unavailable)"
    finally:
        store.close()


def _state_json(state: AccountState) -> dict[str, Any]:
    return {"account": state.account_id, "status": state.status, "balance": format_amount(state.balance_micros),
            "reserved": format_amount(state.reserved_micros), "available": format_amount(state.available_micros),
            "live_calls": state.live_calls, "overrun": format_amount(state.overrun_micros)}


@click.command(name="rebuild-cache")
@click.argument("account_ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def rebuild_cache(ctx: click.Context, account_ids: tuple[str, ...], as_json: bool) -> None:
    """Recompute accounts in Redis from the SQL ledger (all accounts when no ID is given).

    Safe while calls run: what live calls already took from Redis is kept."""
    store = redis_store(ctx)
    if store is None:
        raise BillingError("redis.url is not configured: balances live in the SQL database, nothing to rebuild")
    try:
        ids = list(account_ids)
        if not ids:
            with app(ctx).transaction() as session:
                ids = list(session.scalars(select(Account.id).order_by(Account.id)))
        states = [store.rebuild(account_id) for account_id in ids]
    finally:
        store.close()
    if as_json:
        print_json([_state_json(s) for s in states])
        return
    for s in states:
        click.echo(f"{s.account_id}: balance {format_amount(s.balance_micros)}, reserved "
                   f"{format_amount(s.reserved_micros)}, available {format_amount(s.available_micros)}, "
                   f"{s.live_calls} live calls")
    click.echo(f"rebuilt {len(states)} account(s) from the ledger")
