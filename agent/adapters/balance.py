"""Build the configured balance store: Redis when ``redis.url`` is set, else the SQL database.

A Redis deployment is checked once here (agent/adapters/redis/connect.py): one that would lose
money or cannot take writes raises ``RedisSetupError`` naming redis.url and the reason."""

from __future__ import annotations

from sqlalchemy import Engine

from agent.adapters.sql.balance_store import SqlBalanceStore
from agent.adapters.sql.engine import session_factory
from agent.config import Config
from agent.ports import BalanceStore


def make_balance_store(config: Config, engine: Engine, *, post_later: bool = False) -> BalanceStore:
    """``post_later`` (the daemon): a Redis store writes closed calls' ledger entries to SQL just
    after each step, off the store deadline (agent/adapters/redis/poster.py)."""
    sessions = session_factory(engine)
    if config.redis.url:
        from agent.adapters.redis.connect import check_deployment
        from agent.adapters.redis.store import RedisBalanceStore, make_client
        from agent.redis_url import parse_redis_url

        client = make_client(config.redis.url, config.redis.timeout_ms)
        try:
            check_deployment(client, parse_redis_url(config.redis.url))
        except BaseException:
            client.close()
            raise
        return RedisBalanceStore(client, sessions, key_prefix=config.redis.key_prefix, post_later=post_later)
    return SqlBalanceStore(sessions)
