"""A per-key cache of something read from SQL for the authorization hot path (an account's plan,
its bundle grants): one owner of the freshness, the outage and the background-refresh rules.

* A fresh entry (younger than ``ttl_ms``, or ``negative_ttl_ms`` for "not found") is served.
* A stale entry is served at once and, with ``background`` (the daemon), read again by a
  greenlet of its own: an authorization never waits on SQL for an account it has seen (bench
  bench_bundles.py found the 5 s re-read of bundle grants to be the whole p99 of an
  authorization). Without ``background`` (tools, tests) a stale entry is read again in line.
* An entry never seen is read in line: nothing else can answer.
* When the database does not answer, the last known value keeps serving, the database is not
  asked again for ``retry_ms`` (each try would hold a call for the connect timeout), and
  ``stale_since_ms`` says since when; a key never seen raises ``unavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import gevent
import gevent.pool
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session as OrmSession

from agent.adapters.sql.tenants import ChainLevel, chain_of
from agent.core.errors import NotFound

log = logging.getLogger(__name__)

V = TypeVar("V")


class CachedLookup(Generic[V]):
    def __init__(self, what: str, load: Callable[[str], V], now_ms: Callable[[], int], *,
                 unavailable: Callable[[str], Exception], ttl_ms: int, negative_ttl_ms: int | None = None,
                 retry_ms: int = 2_000, background: bool = False, found: Callable[[V], bool] = lambda v: True) -> None:
        self.what = what
        self.load = load
        self.now_ms = now_ms
        self.unavailable = unavailable
        self.ttl_ms = ttl_ms
        self.negative_ttl_ms = ttl_ms if negative_ttl_ms is None else negative_ttl_ms
        self.retry_ms = retry_ms
        self.background = background
        self.found = found
        self._cache: dict[str, tuple[V, int]] = {}
        self._retry_at_ms = 0
        self._refreshing: set[str] = set()
        self._group = gevent.pool.Group()
        self.stale_since_ms: int | None = None  # serving last known values since (the database is down)
        self.stale_served = 0

    def get(self, key: str) -> V:
        now = self.now_ms()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        if cached is not None and self.background:
            if key not in self._refreshing:
                self._refreshing.add(key)
                refresh = self._group.spawn(self._refresh, key)
                refresh.link_exception(lambda g: log.error("%s: refresh of %r failed: %r", self.what, key, g.exception))
            return cached[0]
        return self._read(key, now, cached)

    def _refresh(self, key: str) -> None:
        try:
            self._read(key, self.now_ms(), self._cache.get(key))
        except Exception as exc:  # noqa: BLE001 - the last known value keeps serving
            log.warning("%s: %r not read again (%s); its last known value serves", self.what, key, exc)
        finally:
            self._refreshing.discard(key)

    def _read(self, key: str, now: int, cached: tuple[V, int] | None) -> V:
        if now < self._retry_at_ms:
            return self._last_known(key, cached, "the database failed moments ago")
        try:
            value = self.load(key)
        except SQLAlchemyError as exc:
            self._retry_at_ms = now + self.retry_ms
            if self.stale_since_ms is None:
                self.stale_since_ms = now
                log.error("database unreachable for %s (%s); serving each account's last known value, refusing "
                          "accounts never seen", self.what, exc.__class__.__name__)
            return self._last_known(key, cached, exc.__class__.__name__)
        if self.stale_since_ms is not None:
            log.warning("database answers again for %s after %.1f s (%d calls served a last known value meanwhile)",
                        self.what, (now - self.stale_since_ms) / 1000, self.stale_served)
            self.stale_since_ms = None
            self.stale_served = 0
        self._cache[key] = (value, now + (self.ttl_ms if self.found(value) else self.negative_ttl_ms))
        return value

    def _last_known(self, key: str, cached: tuple[V, int] | None, why: str) -> V:
        if cached is None or not self.found(cached[0]):
            raise self.unavailable(why)
        self.stale_served += 1
        return cached[0]

    def forget(self, key: str | None = None) -> None:
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)

    def close(self) -> None:
        self._group.kill(block=False)


class ChainUnavailable(Exception):
    """The database does not answer and the chain above an account was never read."""


class TenantChains:
    """The levels above each customer account (``tenants.chain_of``: each reseller tenant, its
    parent, the account ``tenant:NAME`` it pays with, that account's plan and currency), cached
    by the rules above for derived charging at authorize (DESIGN §11). A direct customer of the
    operator has the empty chain (one dict look-up on the authorization path); an unknown
    account too (its own rating refuses it). ``background`` re-reads stale entries off the
    authorization path; a tenant moved or a reseller's plan changed is seen within ``ttl_ms``."""

    def __init__(self, engine: Engine, now_ms: Callable[[], int], *, ttl_ms: int = 30_000,
                 negative_ttl_ms: int = 3_000, retry_ms: int = 2_000, background: bool = False) -> None:
        self.engine = engine
        self.lookup: CachedLookup[tuple[ChainLevel, ...] | None] = CachedLookup(
            "tenant chains", self._load, now_ms, ttl_ms=ttl_ms, negative_ttl_ms=negative_ttl_ms, retry_ms=retry_ms,
            background=background, found=lambda chain: chain is not None,
            unavailable=lambda why: ChainUnavailable(f"the database does not answer ({why})"))

    def _load(self, account_id: str) -> tuple[ChainLevel, ...] | None:
        with OrmSession(self.engine) as session:
            try:
                return tuple(chain_of(session, account_id))
            except NotFound:
                return None

    def chain_of(self, account_id: str) -> tuple[ChainLevel, ...]:
        """The levels above ``account_id``, nearest first (() for a direct or unknown account)."""
        try:
            return self.lookup.get(account_id) or ()
        except ChainUnavailable as exc:
            raise ChainUnavailable(f"{exc} and the tenants above account {account_id!r} were never read") from None

    @property
    def stale_since_ms(self) -> int | None:
        return self.lookup.stale_since_ms

    def forget(self, account_id: str | None = None) -> None:
        self.lookup.forget(account_id)

    def close(self) -> None:
        self.lookup.close()
