"""``billing-agent run``: the composition root of the daemon a PBX admin runs.

Builds every part from the configuration, owns every long-lived greenlet, and runs the
lifecycle: start (the status port and the PBX listeners are bound first, so a port in use fails
at once; the database is retried with backoff while /health is red), serve, and on
SIGTERM/SIGINT stop taking new calls at once, supervise the live ones for
``daemon.drain_seconds``, flush the CDRs and exit (a second signal exits at once: reservations
then expire by themselves, no money is lost). Calls still live are handed over: the next start
of the node adopts them from the PBX's resync. SIGHUP reloads the rate plans and the fraud rules.

``gevent.monkey.patch_all()`` has already run (agent/entry.py) when this module is used by the
daemon commands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.pool
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from agent import __version__
from agent.adapters.authorized_journal import AuthorizedJournal
from agent.adapters.cdr.factory import make_cdr_pipeline, spool_path
from agent.adapters.fraud_rules_file import RulesFileError, load_rules
from agent.adapters.http_status import StatusServer
from agent.adapters.sql.account_plans import AccountPlans
from agent.adapters.sql.bundle_book import BundleBook
from agent.adapters.sql.cached_lookup import TenantChains
from agent.adapters.sql.checkpoint import WalCheckpointer
from agent.adapters.sql.engine import make_engine, sqlite_file
from agent.adapters.sql.fraud import SqlAlerts, SqlFraudActions, suspended_by_rule
from agent.adapters.sql.fx_rates import FxBook
from agent.adapters.sql.live_calls import LiveCallFact, LiveCallPublisher, NodeIdInUse, live_call_rows
from agent.adapters.sql.migrate import check_schema
from agent.adapters.sql.models import RatePlan
from agent.adapters.sql.rate_repository import RatePlanCache
from agent.adapters.sql.route_book import RouteBook
from agent.adapters.sql.tenants import ROOT_TENANT
from agent.adapters.sql.warm_up import warm_up
from agent.adapters.webhook import AlertWebhook
from agent.config import NIBBLE_LEAD_MARGIN_MS, Config
from agent.core.balance import LiveCall
from agent.core.errors import BillingError, InvalidInput
from agent.core.events import AuthorizeDecision, AuthorizeRequest
from agent.core.money import format_amount
from agent.core.ratetable import format_instant
from agent.ports import SwitchAdapter
from agent.services.alerts import Alerts
from agent.services.balance_alerts import BalanceWatch
from agent.services.cdr_pipeline import CdrPipeline
from agent.services.clock import SystemClock
from agent.services.engine import Engine as CallEngine
from agent.services.engine import EngineSettings, LeftBehind, NothingToRide
from agent.services.fraud import FraudGuard
from agent.services.metrics import Metrics
from agent.services.rater import PlanRater
from agent.services.routes import CallRouter, ChannelView
from agent.services.store_guard import Journal, StoreGuard, guard_from_config
from agent.services.store_port import EngineStoreAdapter

if TYPE_CHECKING:
    from agent.adapters.redis.carrier_channels import RedisCarrierChannels
from agent.services.call_path import CALL_PATH

log = logging.getLogger("agent.daemon")


class StartupError(BillingError):
    """The daemon cannot start (a port in use, a schema too old...); the message says why."""


def configure_logging(level: str, fmt: str) -> None:
    """One line per event; JSON lines when asked (for log shippers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level != "debug":  # protocol chatter only when debugging
        for noisy in ("panoramisk", "greenswitch", "asyncio", "sqlalchemy.engine", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


@dataclass
class Health:
    """What /health reports; each flag is set by the part that knows."""

    database: tuple[bool, str] = (False, "not connected yet")


class Daemon:
    def __init__(self, config: Config, *, clock: SystemClock | None = None,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.health = Health()
        self.group = gevent.pool.Group()
        self.stopping = gevent.event.Event()
        self.stopped = gevent.event.Event()
        self.sql: Engine | None = None
        self.checkpointer: WalCheckpointer | None = None
        self.store: StoreGuard | None = None
        self.engine: CallEngine | None = None
        self.status: StatusServer | None = None
        self.rate_cache: RatePlanCache | None = None
        self.cdr: CdrPipeline | None = None
        self.publisher: LiveCallPublisher | None = None
        self.plans: AccountPlans | None = None
        self.bundle_book: BundleBook | None = None
        self.fx_book: FxBook | None = None
        self.tenant_chains: TenantChains | None = None
        self.route_book: RouteBook | None = None  # carriers, buy decks, route policies (DESIGN §10)
        self.router: CallRouter | None = None
        self.carrier_channels: RedisCarrierChannels | None = None  # live calls per carrier, every node (Redis)
        self.fraud: FraudGuard | None = None
        self.alerts: Alerts | None = None  # every alert of the node (fraud rules, low balance)
        self.balance_watch: BalanceWatch | None = None
        self.webhook: AlertWebhook | None = None
        self.alert_stream: Any = None  # AlertStream when redis.url is set
        self._redis_client: Any = None  # the alerts' and fraud counters' Redis client
        self.suspension_bus: Any = None  # SuspensionBus when redis.url is set
        self._fraud_cut: set[str] = set()  # calls cut here because a fraud rule suspended their account
        self.adapters: list[SwitchAdapter] = []
        self._signals = 0
        self._database_where = ""
        self._publish_failures = 0
        self._publish_every_s = config.daemon.publish_seconds
        self.authorized_journal = AuthorizedJournal(spool_path(config))

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        """Build and start everything; raises StartupError with the reason when it cannot."""
        began = time.monotonic()
        self._check_spool_dir()
        self._bind_status()
        self.sql = self._connect_database()
        self._check_schema(self.sql)
        self._start_checkpoints(self.sql)
        # Another live run of this node.id refuses the start before anything of the node is
        # touched (its journal, its reservations, its published calls); register checks again.
        publisher = LiveCallPublisher(self.sql, self.config.node.id, publish_seconds=self.config.daemon.publish_seconds)
        self._claim_node_id(lambda host, pid: publisher.check_free(host=host, pid=pid))
        self.store = self._make_store(self.sql)
        self.rate_cache = self._make_rate_cache(self.sql)
        self.cdr = make_cdr_pipeline(self.config, self.sql, metrics=self.metrics)
        self.cdr.start()
        # Stale entries are read again off the authorization path (background).
        plans = self.plans = AccountPlans(self.sql, self.clock.now_ms, background=True)
        bundle_book = self.bundle_book = BundleBook(self.sql, self.clock.now_ms, background=True)
        fx_book = self.fx_book = FxBook(self.sql, self.clock.now_ms, background=True)  # DESIGN §11
        chains = self.tenant_chains = TenantChains(self.sql, self.clock.now_ms, background=True)  # DESIGN §11
        billing = self.config.billing
        rater = PlanRater(plans.rating_of, self.rate_cache, bundle_book.grants_of, fx_of=fx_book.conversion,
                          chain_of=chains.chain_of)
        store = EngineStoreAdapter(self.store, node=self.config.node.id,
                                   ttl_ms=billing.reservation_ttl_seconds * 1000)
        self.engine = CallEngine(
            settings=EngineSettings(
                node=self.config.node.id, nibble_seconds=billing.nibble_seconds,
                warning_seconds=billing.warning_seconds,
                hangup_verify_ms=int(billing.hangup_verify_seconds * 1000),
                max_call_seconds=billing.max_call_seconds,
                reservation_ttl_ms=billing.reservation_ttl_seconds * 1000,
                nibble_lead_ms=billing.store_timeout_ms + NIBBLE_LEAD_MARGIN_MS),
            store=store, rater=rater,
            clock=self.clock, cdr=self.cdr,
            metrics=self.metrics)
        self._offer_adoption(self.engine, self.store)
        self._start_authorized_journal(self.engine)
        self._start_fraud(self.engine, self.sql, self.store)
        self._start_routing(self.engine, self.sql)
        self.engine.start()
        self._warm_up(rater)
        self._start_adapters(self.engine)
        pbx = ",".join(a.name for a in self.adapters)
        self._claim_node_id(lambda host, pid: publisher.register(host=host, pid=pid, version=__version__, pbx=pbx))
        self.publisher = publisher
        self._spawn(self._sweep_loop, "reservation sweeper")
        self._spawn(self._journal_sync_loop, "balance journal fsync")
        self._spawn(self._publish_loop, "live-call publisher")
        log.info("billing agent ready in %.2fs: node=%s store=%s pbx=%s status=%s", time.monotonic() - began,
                 self.config.node.id, "redis" if self.config.redis.url else "sql",
                 ",".join(a.name for a in self.adapters) or "none", self.status_url or "disabled")

    def _warm_up(self, rater: PlanRater) -> None:
        """Before the PBX adapters accept calls: the first calls' look-ups read and the store's
        statements compiled (agent/adapters/sql/warm_up.py)."""
        assert self.sql is not None and self.store is not None
        report = warm_up(self.sql, rater=rater, store=self.store.store, node=self.config.node.id,
                         now_ms=self.clock.now_ms())
        if report is not None:
            log.info("warmed up in %.0f ms: look-ups of %d of %d accounts read%s", report.elapsed_ms,
                     report.accounts, report.of, ", the balance store's statements compiled" if report.store else "")

    @staticmethod
    def _claim_node_id(claim: Callable[[str, int], None]) -> None:
        try:
            claim(socket.gethostname(), os.getpid())
        except NodeIdInUse as exc:
            raise StartupError(str(exc)) from None

    @property
    def status_url(self) -> str:
        if self.status is None:
            return ""
        return f"http://{self.config.metrics.host}:{self.status.port}"

    def _check_spool_dir(self) -> None:
        """The CDR spool and the balance journal live in ``cdr.spool_dir``: a folder that cannot
        be made or written stops the start with the key, before anything is bound."""
        folder = spool_path(self.config)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cdr.spool_dir: cannot create {folder}: {exc.strerror or exc}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StartupError(f"cdr.spool_dir: {folder} is not writable by this user")

    def _start_checkpoints(self, engine: Engine) -> None:
        """SQLite: the write-ahead log copied back into the file in gevent's thread pool, never
        inside a commit of the loop (agent/adapters/sql/checkpoint.py)."""
        path = sqlite_file(engine.url)
        if path is None:
            return
        checkpointer = self.checkpointer = WalCheckpointer(path)
        # Through the drain too (calls still settle): the shutdown kills it with the other loops.
        self._spawn(lambda: checkpointer.run(self.stopped), "SQLite checkpointer")

    def _spawn(self, func: Callable[[], None], what: str) -> None:
        greenlet = self.group.spawn(func)
        greenlet.link_exception(lambda g: log.critical("%s died: %r", what, g.exception))

    def _bind_status(self) -> None:
        metrics = self.config.metrics
        if not metrics.enabled:
            return
        checks = {"database": self._database_health, "store": self._store_health, "pbx": self._pbx_health,
                  "cdr": self._cdr_health, "node": self._node_health}
        self.status = StatusServer(metrics.host, metrics.port, self.metrics, checks, calls=self.live_calls_json)
        try:
            self.status.start()
        except OSError as exc:
            self.status = None
            raise StartupError(f"metrics.port: cannot listen on {metrics.host}:{metrics.port}: "
                               f"{exc.strerror or exc}") from None

    def _database_health(self) -> tuple[bool, str]:
        ok, detail = self.health.database
        stale_since = self.plans.stale_since_ms if self.plans is not None else None
        if stale_since is not None:
            return False, (f"{detail}; calls rated on each account's last known plan since "
                           f"{format_instant(stale_since)} (the database does not answer)")
        return ok, detail

    def _node_health(self) -> tuple[bool, str]:
        """Red once another run has taken this run's node.id over (its publish found the row changed)."""
        publisher = self.publisher
        if publisher is None:
            return False, "not registered yet"
        other = publisher.taken_over_by
        if other is not None:
            return False, (f"node.id {self.config.node.id!r} taken over by another run on "
                           f"{other.describe(datetime.now(UTC))}: live calls no longer published, hangup "
                           f"requests not carried out; give each daemon its own node.id and restart this one")
        return True, f"{self.config.node.id} (host {socket.gethostname()}, pid {os.getpid()})"

    def _store_health(self) -> tuple[bool, str]:
        if self.store is None:
            return False, "not connected yet"
        kind = "redis" if self.config.redis.url else "sql"
        if self.store.available:
            return True, kind
        masters = [shard for shard in self.store.down_shards() if shard]
        where = f": master {', '.join(masters)} (the other masters' calls go on)" if masters else ""
        return False, f"{kind} unreachable{where} ({self.config.billing.failure_policy})"

    def _pbx_health(self) -> tuple[bool, str]:
        if not self.adapters:
            return True, "no PBX adapter enabled"
        states = {a.name: a.connected() for a in self.adapters}
        down = [name for name, up in states.items() if not up]
        return not down, "down: " + ", ".join(down) if down else "connected: " + ", ".join(states)

    def _cdr_health(self) -> tuple[bool, str]:
        if self.cdr is None:
            return False, "not started"
        c = self.cdr.counters
        # The spool keeps CDRs through a database outage: not a reason to fail the health check.
        return True, f"{c.spooled} spooled, {c.written} in SQL, {c.refused} refused by the spool"

    def _connect_database(self) -> Engine:
        db = self.config.database
        # SQLite: no checkpoint inside the loop's commits; _start_checkpoints runs them in a thread.
        engine = make_engine(db.url, pool_size=db.pool_size, connect_timeout_seconds=db.connect_timeout_seconds,
                             echo=db.echo, wal_autocheckpoint=False)
        delay = 0.5
        where = self._database_where = engine.url.render_as_string(hide_password=True)
        while not self.stopping.is_set():
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                self.health.database = (True, where)
                self.metrics.connection_up.labels("database").set(1)
                return engine
            except SQLAlchemyError as exc:
                self.health.database = (False, f"{where}: {exc.__class__.__name__}")
                self.metrics.connection_up.labels("database").set(0)
                log.error("database %s unreachable (%s); retrying in %.1fs", where,
                          str(getattr(exc, "orig", exc)).strip(), delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, self.config.daemon.startup_retry_max_seconds)
        raise StartupError("stopped while waiting for the database")

    @staticmethod
    def _check_schema(engine: Engine) -> None:
        try:
            check_schema(engine)
        except BillingError as exc:
            raise StartupError(str(exc)) from None

    def _make_store(self, engine: Engine) -> StoreGuard:
        from agent.adapters.balance import make_balance_store

        if self.config.redis.url and engine.dialect.name == "sqlite":
            # Several nodes sharing balances need a shared SQL server; and under gevent, SQLite's
            # busy wait blocks the whole process while another greenlet holds its write lock
            # across a Redis round trip (seen as "database is locked" after a long freeze).
            raise StartupError("redis.url is set but database.url is SQLite: the Redis balance store is for "
                               "several nodes and needs a shared PostgreSQL or MariaDB database "
                               "(or remove redis.url to use the embedded SQL store)")

        journal = journal_path(self.config)
        journal.parent.mkdir(parents=True, exist_ok=True)
        try:
            store = make_balance_store(self.config, engine, post_later=True)
        except InvalidInput as exc:  # redis.url names a deployment unfit for balances (connect.py)
            raise StartupError(str(exc)) from None
        guard = guard_from_config(store, self.config.billing, self.clock, journal)
        replayed = guard.recover()
        if replayed:
            log.warning("replayed %d balance steps journaled by an earlier run", replayed)
        return guard

    def _make_rate_cache(self, engine: Engine) -> RatePlanCache:
        cache = RatePlanCache(engine, check_interval_seconds=self.config.daemon.rates_poll_seconds)
        with engine.connect() as conn:
            names = list(conn.scalars(select(RatePlan.name).where(RatePlan.carrier_id.is_(None))))  # sell plans
        cache.preload(names)
        log.info("rate plans loaded: %s", ", ".join(names) or "none")
        return cache

    def _offer_adoption(self, engine: CallEngine, store: StoreGuard) -> None:
        """Calls an earlier run of this node left supervised (hand-over at shutdown, a crash):
        the first resync of each PBX adopts those still live and settles those that ended.

        Two sources: the open reservations in the balance store, and what the earlier run
        published in ``live_calls``. A call published but unknown to the store (a Redis that
        restarted empty while no agent ran) is adopted too, from nothing debited: supervised
        again it re-reserves and its settle charges its whole cost; ended, it gets its CDR.
        Before, such calls went unbilled with no record (bench/bench_faults.py)."""
        mine = self._open_reservations(store)
        if mine is None:
            return  # the store stayed unreachable: its reservations expire (the sweeper) as before
        stored = {c.call_id for c in mine}
        held: dict[str, LiveCall] = {c.call_id: c for c in mine}
        rows = []
        journaled = self.authorized_journal.read()  # calls authorized since the earlier run's last publish
        if self.sql is not None:  # what the earlier run published, before register() clears it
            try:
                rows = [row for row in live_call_rows(self.sql) if row.node == self.config.node.id]
            except SQLAlchemyError as exc:
                log.warning("cannot read the calls the earlier run published: %s", exc)
        now_ms = self.clock.now_ms()
        ttl_ms = self.config.billing.reservation_ttl_seconds * 1000
        for row in rows:
            if row.call_id not in held and row.account_id:
                log.warning("call=%s account=%s: published by an earlier run of node %s but unknown to the balance "
                            "store (restarted empty?); adopting it from its published facts", row.call_id,
                            row.account_id, row.node)
                held[row.call_id] = LiveCall(account_id=row.account_id, call_id=row.call_id, node=row.node, seq=0,
                                             reserved_micros=0, debited_micros=0, overrun_micros=0,
                                             created_ms=_epoch_ms(row.authorized_at), expires_ms=now_ms + ttl_ms)
        engine.adoptable = held
        engine.unreserved = set(held) - stored
        engine.adoptable_facts = {row.call_id: LeftBehind(
            call_id=row.call_id, pbx=row.pbx, destination=row.destination, caller=row.caller,
            a_leg_id=row.a_leg_id, authorized_ms=_epoch_ms(row.authorized_at),
            answered_ms=_epoch_ms(row.answered_at) if row.answered_at is not None else None) for row in rows}
        for call_id in held.keys() - engine.adoptable_facts.keys():
            entry = journaled.get(call_id)
            if entry is not None:
                try:
                    engine.adoptable_facts[call_id] = LeftBehind(
                        call_id=call_id, pbx=str(entry["pbx"]), destination=str(entry["destination"]),
                        caller=str(entry["caller"]), a_leg_id=str(entry["a_leg_id"]),
                        authorized_ms=int(str(entry["authorized_ms"])), answered_ms=None)
                except (KeyError, ValueError) as exc:
                    log.warning("authorized-calls journal: call=%s: %r missing or wrong; skipped", call_id, exc)
        if held:
            log.warning("%d calls of node %s from an earlier run still hold reservations; adopting those the PBX "
                        "still shows", len(held), self.config.node.id)

    def _start_fraud(self, engine: CallEngine, sql: Engine, store: StoreGuard) -> None:
        """The alert service and the low-balance watch (always), then the fraud rules
        (``fraud.rules_file``): a file with an error stops the start, naming it."""
        alerts = self._start_alerts(engine, sql, store)
        path = self.config.fraud.rules_file
        if not path:
            return
        try:
            rules = load_rules(path)
        except RulesFileError as exc:
            raise StartupError(f"fraud.rules_file: {exc}") from None
        refresh = getattr(store.store, "refresh", None)  # Redis keeps the status of its own
        counters = tenant_counters = None
        redis = self.config.redis
        # The balance store's own client when it is Redis: the counters' observe then rides in the
        # store's authorize round trip (one round trip per screened call, agent/ports.py StoreRider).
        client = getattr(store.store, "client", None) or self._redis_client
        if client is not None:  # the figures shared by every node (a tenant's too: count: tenant)
            from agent.adapters.redis.counters import RedisFraudCounters

            own, per_tenant = rules.split()
            live_ttl_ms = (self.config.billing.max_call_seconds + NO_ANSWER_GUARD_S) * 1000
            counters = RedisFraudCounters(client, key_prefix=redis.key_prefix, rules=own, live_ttl_ms=live_ttl_ms)
            tenant_counters = RedisFraudCounters(client, key_prefix=redis.key_prefix, rules=per_tenant,
                                                 live_ttl_ms=live_ttl_ms)
        guard = self.fraud = FraudGuard(
            rules, node=self.config.node.id, actions=SqlFraudActions(sql, refresh), clock=self.clock,
            metrics=self.metrics, counters=counters, alerts=alerts, timezone_of=self._timezone_of,
            tenants_of=self._tenants_of, tenant_counters=tenant_counters)
        guard.cut_local = engine.cut_account
        if client is not None:  # every node cuts at once, not at its next publish
            from agent.adapters.redis.fraud_bus import SuspensionBus

            bus = self.suspension_bus = SuspensionBus(client, key_prefix=redis.key_prefix, node=self.config.node.id,
                                                      on_suspended=self._cut_for_suspension)
            guard.on_suspension_written.append(bus.publish)
            bus.start()
        engine.screens.append(guard)
        engine.on_finished.append(guard.finished)
        guard.start()
        log.info("fraud rules: %d rules, %d destination groups from %s, counters %s", len(rules.rules),
                 len(rules.groups), path, "in Redis (every node)" if counters else "in memory (this node)")

    def _start_routing(self, engine: CallEngine, sql: Engine) -> None:
        """Wholesale routing (DESIGN §10): the carriers and every enabled carrier's buy deck in
        memory before the first call (a deck imported later loads beside the calls), the router
        in the engine and its margin alerts at settle. With no carrier defined the router routes
        nothing and the dialplans dial their own trunk."""
        book = self.route_book = RouteBook(sql, self.clock.now_ms,
                                           check_interval_seconds=self.config.daemon.rates_poll_seconds,
                                           background=True)
        try:
            decks = book.preload()
        except Exception as exc:  # noqa: BLE001 - the database answered the schema check a moment ago
            raise StartupError(f"carriers and buy decks cannot be read: {exc}") from None
        alerts = self.alerts
        live: Mapping[str, int] = engine.carrier_calls
        client = self._redis_client
        if client is not None:  # channel limits count the calls of every node (DESIGN §10)
            from agent.adapters.redis.carrier_channels import RedisCarrierChannels

            def carrier_names() -> list[str]:
                try:
                    return [c.name for c in book.carriers.get("*")]
                except Exception:  # noqa: BLE001 - the database away: the carriers with calls here
                    return list(engine.carrier_calls)

            shared = self.carrier_channels = RedisCarrierChannels(
                client, key_prefix=self.config.redis.key_prefix, now_ms=self.clock.now_ms, carriers=carrier_names,
                live=engine.live_carriers)
            engine.carrier_claims = shared
            live = ChannelView(engine.carrier_calls, shared.counts)
            shared.start()
        router = self.router = CallRouter(book, node=self.config.node.id, live_channels=lambda: live,
                                          alert=alerts.submit if alerts is not None else None)
        engine.router = router
        engine.on_finished.append(router.finished)
        if decks:
            log.info("routing: %d carriers with buy decks (%s)", len(decks), ", ".join(decks))

    def _start_alerts(self, engine: CallEngine, sql: Engine, store: StoreGuard) -> Alerts:
        """The node's alert service (``agent/services/alerts.py``): the ``alerts`` table through a
        spool in ``{cdr.spool_dir}/alerts`` (what an earlier run left is written now), the webhook
        (``fraud.webhook_url``) and the Redis Stream (``redis.url``), each with its own spool; and
        the low-balance watch on every settled call."""
        fraud = self.config.fraud
        if fraud.webhook_url and not fraud.webhook_secret:
            raise StartupError("fraud.webhook_secret: must be set when fraud.webhook_url is (it signs every alert)")
        from agent.adapters.alert_spool import AlertSpool
        from agent.adapters.sql.low_balance import LowBalanceThresholds

        folder = spool_path(self.config) / "alerts"
        try:
            queue = AlertSpool(folder / "sql.jsonl")
        except OSError as exc:
            raise StartupError(f"cdr.spool_dir: cannot open the alert spool in {folder}: {exc.strerror or exc}"
                               ) from None
        alerts = self.alerts = Alerts(SqlAlerts(sql), node=self.config.node.id, clock=self.clock,
                                      metrics=self.metrics, queue=queue,
                                      period_ms=int(fraud.alert_period_seconds * 1000))
        redis = self.config.redis
        if redis.url:
            from agent.adapters.redis.alert_stream import AlertStream
            from agent.adapters.redis.store import make_client

            self._redis_client = make_client(redis.url, redis.timeout_ms)
            stream = self.alert_stream = AlertStream(self._redis_client, key_prefix=redis.key_prefix,
                                                     queue=AlertSpool(folder / "stream.jsonl"))
            alerts.deliveries.append(stream)
            stream.start()
        if fraud.webhook_url:
            webhook = self.webhook = AlertWebhook(fraud.webhook_url, fraud.webhook_secret, folder,
                                                  timeout_s=fraud.webhook_timeout_seconds)
            alerts.deliveries.append(webhook)
            webhook.start()
        alerts.start()
        thresholds = LowBalanceThresholds(sql, self.clock.now_ms)
        watch = self.balance_watch = BalanceWatch(
            alerts, threshold_of=thresholds.threshold_of, account_state=store.account_state,
            node=self.config.node.id, clock=self.clock, nibble_seconds=self.config.billing.nibble_seconds)
        engine.on_finished.append(watch.finished)
        watch.start()
        return alerts

    def _timezone_of(self, account_id: str, plan: str) -> str:
        """The timezone of the account's rate plan (``plan`` when the caller knows it): the fraud
        rules' CEL ``hour`` and ``weekday`` are read in it. Both lookups are the rater's caches."""
        plans, rates = self.plans, self.rate_cache
        if plans is None or rates is None:
            return "UTC"
        name = plan or plans.plan_of(account_id)
        return rates.table_for(name).timezone if name else "UTC"

    def _tenants_of(self, account_id: str) -> frozenset[str]:
        """The tenants an account is under, its own up to the operator's (fraud rules' ``tenant:``),
        from the rater's cached chains (DESIGN §11)."""
        chain = self.tenant_chains.chain_of(account_id) if self.tenant_chains is not None else ()
        return frozenset({ROOT_TENANT, *(level.tenant for level in chain), *(level.parent for level in chain)})

    def reload_fraud_rules(self) -> bool:
        """SIGHUP: re-read the fraud rules; a file with an error keeps the running rules."""
        path = self.config.fraud.rules_file
        if self.fraud is None or not path:
            return False
        try:
            rules = load_rules(path)
        except RulesFileError as exc:
            log.error("SIGHUP: fraud rules not reloaded, keeping the running ones:\n%s", exc)
            return False
        self.fraud.replace_rules(rules)
        return True

    def _start_authorized_journal(self, engine: CallEngine) -> None:
        """A new journal of the calls this run authorizes (agent/adapters/authorized_journal.py)."""
        journal = self.authorized_journal
        try:
            journal.start()
        except OSError as exc:
            log.error("authorized-calls journal %s: %s; calls authorized just before a crash will be settled "
                      "from the balance store only", journal.path, exc.strerror or exc)
            return

        engine.screens.append(_JournalScreen(journal))

    def _open_reservations(self, store: StoreGuard) -> list[LiveCall] | None:
        """This node's open reservations. A store that does not answer at start (Redis
        restarting, say) is asked again for ``ADOPTION_LISTING_WAIT_S``: giving up at once left
        every call of the earlier run unadopted, unbilled and without a CDR."""
        deadline = time.monotonic() + ADOPTION_LISTING_WAIT_S
        delay_s = 0.2
        while True:
            try:
                return [c for c in store.live_calls() if c.node == self.config.node.id]
            except Exception as exc:  # noqa: BLE001 - any store failure: ask again, then give up with the reason
                if time.monotonic() + delay_s > deadline:
                    log.error("cannot list the open reservations of an earlier run after %.0f s: %s; calls it left "
                              "are not adopted (their reservations expire, charging what their nibbles debited)",
                              ADOPTION_LISTING_WAIT_S, exc)
                    return None
                log.warning("cannot list the open reservations of an earlier run yet (%s); asking again", exc)
                gevent.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)

    def _start_adapters(self, engine: CallEngine) -> None:
        """Bind every enabled PBX listener now (a port in use fails the start)."""
        if self.config.asterisk.enabled:
            from agent.adapters.asterisk.adapter import AsteriskAdapter, AsteriskSettings

            self._start_adapter(engine, AsteriskAdapter(engine, AsteriskSettings.from_config(self.config.asterisk)),
                                f"asterisk.agi_port {self.config.asterisk.agi_host}:{self.config.asterisk.agi_port}")
        if self.config.freeswitch.enabled:
            from agent.adapters.freeswitch.adapter import FreeswitchAdapter, FreeswitchSettings

            self._start_adapter(engine, FreeswitchAdapter(engine, FreeswitchSettings.from_config(
                self.config.freeswitch)), f"freeswitch {self.config.freeswitch.host}:{self.config.freeswitch.port}")
        if not self.adapters:
            log.warning("no PBX adapter enabled (asterisk.enabled / freeswitch.enabled): no call will reach "
                        "this agent")

    def _start_adapter(self, engine: CallEngine, adapter: SwitchAdapter, where: str) -> None:
        engine.add_switch(adapter)
        try:
            adapter.start()
        except OSError as exc:
            raise StartupError(f"{where}: cannot listen: {exc.strerror or exc}") from None
        self.adapters.append(adapter)

    # ---------------------------------------------------------------- live calls

    def live_call_facts(self) -> list[LiveCallFact]:
        if self.engine is None:
            return []
        return [LiveCallFact(s.call_id, s.pbx, s.account_id, s.destination, s.caller, s.a_leg.leg_id,
                             s.authorized_ms, s.answer_ms, s.cut_at_ms if s.exhausted else None)
                for s in list(self.engine.registry.sessions.values())]

    def live_call_dicts(self) -> list[dict[str, Any]]:
        """This node's calls with their money in micro-units, as the engine sees them (the demo's view;
        ``live_calls_json`` formats them for /calls)."""
        if self.engine is None:
            return []
        now = self.clock.now_ms()
        return [{
            "call_id": s.call_id, "account": s.account_id, "destination": s.destination, "caller": s.caller,
            "node": s.node, "pbx": s.pbx, "phase": s.phase.value,
            "answered_seconds": (now - s.answer_ms) // 1000 if s.answer_ms else 0,
            "spent_micros": s.debited_micros, "budget_micros": s.budget_micros,
            "cut_at_ms": s.cut_at_ms if s.exhausted else None,
        } for s in list(self.engine.registry.sessions.values())]

    def live_calls_json(self) -> list[dict[str, Any]]:
        """/calls: amounts as decimal strings (DESIGN §7), instants as ISO 8601 UTC."""
        out = []
        for call in self.live_call_dicts():
            call["spent"] = format_amount(call.pop("spent_micros"))
            call["budget"] = format_amount(call.pop("budget_micros"))
            cut_at_ms = call.pop("cut_at_ms")
            call["cut_at"] = format_instant(cut_at_ms) if cut_at_ms else None
            out.append(call)
        return out

    # ---------------------------------------------------------------- background work

    def _journal_sync_loop(self) -> None:
        """Group commit of the balance journal, in gevent's thread pool (never an fsync on the hub)."""
        pool = gevent.get_hub().threadpool
        while not self.stopping.is_set():
            store = self.store
            if store is not None:
                try:
                    pool.apply(store.journal.sync)
                except OSError as exc:
                    log.error("balance journal fsync failed: %s", exc)
            self.stopping.wait(Journal.SYNC_INTERVAL_S)

    def _sweep_loop(self) -> None:
        interval = self.config.daemon.sweep_seconds
        while not self.stopping.wait(interval):
            CALL_PATH.yield_to_calls()
            self.sweep_once()

    def sweep_once(self) -> None:
        store = self.store
        if store is None:
            return
        try:
            replayed = store.recover()
            if replayed:
                log.warning("balance store back: %d journaled steps replayed", replayed)
            report = store.expire(self.clock.now_ms())
            self.metrics.store_rebuilt_accounts.inc(report.rebuilt)
            if report.expired:
                log.warning("released %d expired reservations: %s", len(report.expired),
                            ", ".join(report.expired[:10]))
        except Exception as exc:  # the store being down is reported by /health, never fatal
            log.error("reservation sweep failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        self.metrics.connection_up.labels("store").set(1 if store.available else 0)
        self.metrics.ledger_backlog.set(getattr(store.store, "ledger_backlog", 0))  # Redis store only

    def _publish_loop(self) -> None:
        # Also while draining: live calls stay listed and operators' hangups are carried out until
        # the shutdown kills this greenlet.
        interval = self.config.daemon.publish_seconds
        while True:
            CALL_PATH.yield_to_calls()
            self.publish_once()
            gevent.sleep(interval)

    def publish_once(self) -> None:
        """Publish live calls and the heartbeat, carry out operators' hangups, sample connection states."""
        for adapter in self.adapters:
            self.metrics.connection_up.labels(adapter.name).set(1 if adapter.connected() else 0)
        publisher, engine = self.publisher, self.engine
        if publisher is None or engine is None:
            return
        try:
            publisher.publish(self.live_call_facts())
            CALL_PATH.step_aside()  # each table its own piece of the loop's time
            for command in publisher.pending_commands():
                found = engine.request_hangup(command.call_id, command.reason or "operator request")
                publisher.complete(command.id, "hangup sent" if found else "call already ended")
            if self.fraud is not None and self.sql is not None:
                CALL_PATH.step_aside()
                self._cut_suspended_accounts(engine, self.sql)
            self.health.database = (True, self._database_where)
            self.metrics.connection_up.labels("database").set(1)
            if self._publish_failures:
                log.warning("publishing live calls works again after %d failed attempts", self._publish_failures)
                self._publish_failures = 0
        except SQLAlchemyError as exc:
            self.health.database = (False, f"{self._database_where}: {exc.__class__.__name__}")
            self.metrics.connection_up.labels("database").set(0)
            self._publish_failures += 1
            # The first failure, then one line a minute: an outage must not flood the log.
            if self._publish_failures == 1 or self._publish_failures % max(1, int(60 / self._publish_every_s)) == 0:
                log.error("publishing live calls failed (database, %d attempts so far): %s", self._publish_failures,
                          str(getattr(exc, "orig", exc)).strip())

    def _cut_for_suspension(self, account_id: str, rule: str) -> None:
        """Another node suspended the account (the Redis bus): cut this node's calls of it now."""
        if self.engine is None:
            return
        cut = [c for c in self.engine.cut_account(account_id, f"account suspended by fraud rule {rule}")
               if c not in self._fraud_cut]
        self._fraud_cut.update(cut)
        log.warning("FRAUD SUSPEND account=%s rule=%s (another node): %d live calls cut on node %s", account_id,
                    rule, len(cut), self.config.node.id)

    def _cut_suspended_accounts(self, engine: CallEngine, sql: Engine) -> None:
        """Cut this node's calls of accounts a fraud rule suspended, on whichever node: the
        suspending node queues hangups for the calls published then, and this catches the calls
        authorized here just before the suspension and not yet published."""
        live: dict[str, list[str]] = {}
        for session in list(engine.registry.sessions.values()):
            live.setdefault(session.account_id, []).append(session.call_id)
        self._fraud_cut &= {call_id for calls in live.values() for call_id in calls}
        if not live:
            return
        for account_id, rule in suspended_by_rule(sql).items():
            if account_id not in live:
                continue
            fresh = [call_id for call_id in live[account_id] if call_id not in self._fraud_cut]
            for call_id in fresh:
                engine.request_hangup(call_id, f"account suspended by fraud rule {rule}")
                self._fraud_cut.add(call_id)
            if fresh:
                log.warning("FRAUD SUSPEND account=%s rule=%s: %d live calls cut on node %s", account_id, rule,
                            len(fresh), self.config.node.id)

    def reload(self) -> None:
        """SIGHUP: re-read the rate plans and the configuration file. Logging applies at once;
        other changed keys are named and need a restart (they shape connections and listeners)."""
        if self.rate_cache is not None:
            self.rate_cache.refresh_all()
        log.info("rate plans checked for changes (SIGHUP)")
        if self.bundle_book is not None:
            self.bundle_book.forget()  # bundle grants are read again at each account's next call
        if self.fx_book is not None:
            self.fx_book.forget()  # FX rates too, at the next call of each currency pair
        if self.tenant_chains is not None:
            self.tenant_chains.forget()  # the tenants above each account too
        if self.route_book is not None:
            self.route_book.refresh_all()  # carriers, route policies, buy decks' versions
        self.reload_fraud_rules()
        if self.reload_config is None:
            return
        try:
            new = self.reload_config()
        except Exception as exc:  # a bad edit must not take the running daemon down
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc, exc_info=True)
            return
        if new.logging != self.config.logging:
            configure_logging(new.logging.level, new.logging.format)
            log.info("SIGHUP: logging now level=%s format=%s", new.logging.level, new.logging.format)
        pending = [f"{section}.{key}" for section, key in _changed_keys(self.config, new) if section != "logging"]
        if pending:
            log.warning("SIGHUP: changed keys that take effect only after a restart: %s", ", ".join(pending))
        self.config = dataclasses.replace(self.config, logging=new.logging)

    # ---------------------------------------------------------------- run and stop

    def install_signals(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        gevent.signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload, "rate reload"))

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now; open reservations expire by themselves (no money is lost)", name)
            logging.shutdown()
            os._exit(130)
        live = self.engine.live_calls() if self.engine else 0
        log.info("%s: refusing new calls; draining %d live calls for up to %.0fs", name, live,
                 self.config.daemon.drain_seconds)
        self.stopping.set()
        if self.engine is not None:
            self.engine.stop_accepting()

    def run_until_stopped(self) -> None:
        self.stopping.wait()
        self.shutdown()

    def shutdown(self) -> float:
        """Stop in order; returns the seconds it took. Each step is bounded, so that with the
        shipped drain (20 s) the agent is gone well within systemd's 30-40 s stop timeout. Calls
        still live after the drain keep their reservations: the next start of this node adopts
        them from the PBX's resync, or they expire (the PBX limit still ends them)."""
        began = time.monotonic()
        self.stopping.set()
        engine = self.engine
        if engine is not None:
            engine.stop_accepting()
            live = engine.live_calls()
            if live and not self._timed("drain", lambda: engine.drain(self.config.daemon.drain_seconds)):
                log.warning("%d calls still live after the drain: their reservations stay open; the next start of node "
                            "%s adopts those still live, the others expire", engine.live_calls(),
                            self.config.node.id)
        for adapter in reversed(self.adapters):
            self._timed(f"stop {adapter.name}", lambda a=adapter: a.stop(2.0))  # type: ignore[misc]
        if engine is not None:
            self._timed("stop engine", lambda: engine.stop(3))
        if self.balance_watch is not None:
            watch = self.balance_watch
            self._timed("stop the low-balance watch", lambda: watch.stop(1))
        if self.fraud is not None:
            fraud = self.fraud
            self._timed("write fraud suspensions", lambda: fraud.stop(2))
        if self.alerts is not None:  # what is not in SQL yet stays in its spool for the next start
            alerts = self.alerts
            self._timed("write alerts", lambda: alerts.stop(2))
        if self.alert_stream is not None:
            stream = self.alert_stream
            self._timed("stop the alert stream", lambda: stream.stop(1))
        if self.suspension_bus is not None:
            bus = self.suspension_bus
            self._timed("stop the suspension bus", lambda: bus.stop(1))
        if self.webhook is not None:  # what it did not deliver stays in its spool for the next start
            webhook = self.webhook
            self._timed("stop the alert webhook", lambda: webhook.stop(1))
        self._timed("stop background greenlets", lambda: self.group.kill(timeout=2))
        if self.carrier_channels is not None:
            channels = self.carrier_channels
            self._timed("write the carrier channel counts", lambda: channels.stop(1))
        if self.route_book is not None:
            self._timed("stop the route book", self.route_book.close)
        if self.cdr is not None:
            cdr = self.cdr
            self._timed("flush CDRs", lambda: cdr.stop(5))
        if self.publisher is not None:
            publisher, handed_over = self.publisher, self.live_call_facts()
            self._timed("unpublish live calls", lambda: publisher.stopped(handed_over))
        if self.store is not None:
            self._timed("close store", self.store.close)
        self.authorized_journal.close()
        if self.status is not None:
            status = self.status
            self._timed("stop status server", lambda: status.stop(1))
        if self.sql is not None:
            self.sql.dispose()
        took = time.monotonic() - began
        log.info("billing agent stopped in %.1fs", took)
        self.stopped.set()
        return took

    @staticmethod
    def _timed(what: str, func: Callable[[], Any]) -> Any:
        """Run one shutdown step; its failure is logged and the shutdown goes on."""
        began = time.monotonic()
        try:
            return func()
        except Exception:  # shutdown goes on whatever one part does
            log.exception("%s failed during shutdown", what)
            return None
        finally:
            took = time.monotonic() - began
            (log.info if took >= 0.5 else log.debug)("shutdown: %s took %.2fs", what, took)


def _changed_keys(old: Config, new: Config) -> list[tuple[str, str]]:
    changed = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        for key in dataclasses.fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                changed.append((section.name, key.name))
    return changed


def run_daemon(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """``billing-agent run``: returns the exit code."""
    configure_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, reload_config=reload_config)
    daemon.install_signals()
    log.info("billing-agent %s starting: config %s, node %s", __version__, config.source, config.node.id)
    raise_descriptor_limit()
    try:
        daemon.start()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        daemon.shutdown()
        return 2
    if daemon.stopping.is_set():
        daemon.shutdown()
        return 0
    freeze_startup_objects()
    daemon.run_until_stopped()
    return 0


def freeze_startup_objects() -> int:
    """Move what the start built (modules, pools, rate plans, caches) out of the garbage
    collector's reach: a full collection otherwise scans them all, and stops every greenlet for
    its length (50-60 ms in a daemon with the PBX adapters and SQLAlchemy loaded, measured with
    ``gc.callbacks`` under the real-PBX lab), delaying authorizations and cuts in flight. Objects
    made later are collected as before. Returns how many objects were frozen."""
    import gc

    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d objects of the start frozen in %.0f ms (full collections no longer scan them)",
             frozen, (time.perf_counter() - started) * 1000)
    return frozen


def _epoch_ms(moment: datetime) -> int:
    return int(moment.replace(tzinfo=UTC).timestamp() * 1000) if moment.tzinfo is None else int(
        moment.timestamp() * 1000)


class _JournalScreen:
    """Refuses nothing; writes every allowed call to the journal of authorized calls (its
    ``append`` logs and swallows a failed write: the call goes on)."""

    round_trip = False  # a local file: before the store

    def __init__(self, journal: AuthorizedJournal) -> None:
        self.journal = journal

    def screen(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> AuthorizeDecision | None:
        return None

    def ride(self, request: AuthorizeRequest, call_id: str, now_ms: int) -> NothingToRide:
        return NothingToRide()

    def decided(self, request: AuthorizeRequest, decision: AuthorizeDecision) -> None:
        if decision.allowed:
            self.journal.append(call_id=decision.call_id, pbx=request.pbx, a_leg_id=request.leg_id,
                                account_id=request.account_id, destination=request.destination,
                                caller=request.caller, authorized_ms=request.at_ms)


ADOPTION_LISTING_WAIT_S = 15.0  # the store down at start: how long adoption waits for it
# A nibble runs the store deadline plus this before its slice's boundary: the loop turn, the
# batching and a Redis or SQL round trip fit in it, so a store that fails is known in time to
# cut at the boundary.
NO_ANSWER_GUARD_S = 180  # a call neither answered nor ended is released after this (EngineSettings.no_answer_guard_ms)
MIN_DESCRIPTORS = 4096  # calls (AGI sockets), AMI/ESL, SQL and Redis pools, spool segments, status port


def raise_descriptor_limit() -> int:
    """Every call is at least one socket (FastAGI) and the status port may hold a few more: take
    the hard limit the service manager allows (the systemd unit sets LimitNOFILE=65536), and
    say when it is low. Returns the soft limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptors: limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: cannot raise the limit from %d: %s", soft, exc)
    if soft < MIN_DESCRIPTORS:
        log.warning("file descriptors: the limit is %d; %d or more is advised (LimitNOFILE= in the systemd unit, "
                    "ulimit -n)", soft, MIN_DESCRIPTORS)
    return soft


def journal_path(config: Config) -> Path:
    """The StoreGuard's journal of balance steps taken while the store was down (beside the CDR spool)."""
    return spool_path(config) / "balance-journal.jsonl"
