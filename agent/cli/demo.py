"""``billing-agent demo``: the real daemon, a simulated PBX on loopback, a handful of calls.

Everything happens in a temporary folder that is removed at the end: a SQLite database, the
CDR spool, a demo rate deck with prices high enough that money runs out in seconds. The PBX is
simulated (agent/sim) but speaks the real wire protocols to the real adapters: FastAGI and AMI
for Asterisk (the default), the event socket for FreeSWITCH (``--pbx freeswitch``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import gevent
from sqlalchemy import Engine, func, select

from agent.adapters.sql.accounts import create_account, set_limits
from agent.adapters.sql.bundles_admin import (
    account_grants,
    account_timezone,
    check_bundles,
    create_bundle,
    grant_bundle,
    grant_figures,
    sql_periods,
)
from agent.adapters.sql.engine import make_engine, session_factory, transaction
from agent.adapters.sql.migrate import upgrade
from agent.adapters.sql.models import Call, CallLeg, RatingDecision, utcnow
from agent.adapters.sql.rate_import import import_deck
from agent.adapters.sql.reconcile import check_ledger
from agent.config import Config, FraudConfig, load_config
from agent.core.bundles import BundleDef, PeriodKind
from agent.core.money import format_amount, parse_amount

PLAN = "demo"
# Demo prices: a euro-cent a second to France, so a call runs out of money in seconds.
DEMO_DECK = """\
prefix,destination,rate,connect_fee,initial_increment,increment,minimum,grace,effective_from,effective_to,weekdays,time_from,time_to,blocked
33,France (demo price),0.60,0,1,1,0,0,,,,,,no
44,United Kingdom (demo price),0.30,0.02,1,1,0,0,,,,,,no
4490,United Kingdom - Premium,0,0,1,1,0,0,,,,,,yes
882,International Networks (demo price),0.90,0,1,1,0,0,,,,,,no
"""
# The demo's fraud rule: a 4th live call to the high-risk group suspends the account (IRSF).
DEMO_RULES = """\
groups:
  high_risk: {prefixes: ["870", "881", "882", "883", "979", "53"]}
rules:
  - {name: irsf_parallel, kind: live_calls, group: high_risk, threshold: 3, action: suspend}
"""
IRSF_ACCOUNT = "mallory"
# The free-minute bundle (DESIGN §9): dave's call starts in his 5 s bundle to the UK and goes on
# in money (0.30/min: 5,000 micro-units a second), with no connect fee since a bundle covers it.
BUNDLE_ACCOUNT = "dave"
BUNDLE = BundleDef("uk-demo", 5, ("44",), PeriodKind.MONTH)
# A spend cap (DESIGN §8): erin has money, but no call of hers may cost more than 0.03; her call
# to France (a cent a second) is cut at 3 s, the instant it reaches the cap.
CAPPED_ACCOUNT = "erin"
CAPPED_MAX_CALL_COST = "0.03"
# A three-level tenant tree (DESIGN §11): the operator sells to reseller globex (in USD, on the
# operator's plan wholesale-usd, 0.30 USD/min to France); globex sells to zoe (in EUR, on its own
# plan globex-retail, 0.60 USD/min, converted at USD->EUR 0.90). globex's own account holds only
# 0.02 USD: zoe has money, but her call is cut at 4 s, when her reseller can no longer pay.
RESELLER = "globex"
RESELLER_BALANCE = "0.02"
RESELLER_CUSTOMER = "zoe"
WHOLESALE_DECK = "prefix,destination,rate\n33,France (wholesale),0.30\n"
# Wholesale routing (DESIGN §10): the operator buys termination from three carriers. budget is
# the cheapest and is down (the simulated PBX answers 503 on its trunk): every call tries it
# first and goes on to teleco; transat sells in USD, the currency of globex's wholesale plan.
# premium is dearer than the sell price to France and is left out of those calls (revenue assurance).
CARRIERS = (
    ("budget", "EUR", "prefix,destination,rate\n33,France,0.05\n44,UK,0.05\n882,Intl Networks,0.20\n"),
    ("teleco", "EUR", "prefix,destination,rate\n33,France,0.20\n44,UK,0.10\n882,Intl Networks,0.40\n"),
    ("premium", "EUR", "prefix,destination,rate\n33,France,0.90\n"),
    ("transat", "USD", "prefix,destination,rate\n33,France,0.10\n"),
)
DOWN_CARRIER = "budget"
RETAIL_DECK = "prefix,destination,rate\n33,France (globex retail),0.60\n"


@dataclass(frozen=True)
class DemoAccount:
    account_id: str
    balance: str
    max_calls: int | None = None


@dataclass(frozen=True)
class DemoCall:
    label: str
    account: str
    destination: str
    start_after_s: float
    talk_ms: int
    expect: str  # the outcome the demo checks: answered | cut | denied
    caller: str = "1001"


ACCOUNTS = (
    DemoAccount("alice", "5.00"),
    DemoAccount("bob", "0.08"),
    DemoAccount("carol", "0.00"),
    DemoAccount("acme", "0.12"),
    DemoAccount(IRSF_ACCOUNT, "20.00"),
    DemoAccount(BUNDLE_ACCOUNT, "1.00"),
    DemoAccount(CAPPED_ACCOUNT, "5.00"),
)

CALLS = (
    DemoCall("alice talks 5.5 s to France", "alice", "33142685300", 0.0, 5_500, "answered", "1001"),
    DemoCall("bob has 8 s of money, wants 20 s", "bob", "33612345678", 0.5, 20_000, "cut", "1002"),
    DemoCall("carol has no money", "carol", "33142685300", 1.0, 5_000, "denied", "1003"),
    DemoCall("dave: 5 s bundle to the UK, talks 8 s", BUNDLE_ACCOUNT, "442079460000", 0.2, 8_000, "answered",
             "1006"),
    DemoCall(f"erin: 5.00 of money, calls capped at {CAPPED_MAX_CALL_COST}", CAPPED_ACCOUNT, "33142685301", 0.3,
             10_000, "cut", "1007"),
    DemoCall("alice dials a blocked premium number", "alice", "449012345", 1.5, 5_000, "denied", "1001"),
    DemoCall("acme line 1 (0.12 shared by two calls)", "acme", "33140000001", 2.0, 20_000, "cut", "1004"),
    DemoCall("acme line 2 (0.12 shared by two calls)", "acme", "33140000002", 2.0, 20_000, "cut", "1005"),
    # IRSF: a hijacked PBX account opens parallel calls to premium international ranges; the 4th
    # live one trips the fraud rule: the account is suspended, its calls cut, the rest refused.
    # (a second between the 3rd and the 4th: the 3rd is answered before the rule cuts it)
    *(DemoCall(f"mallory (hijacked) premium call {n + 1}", IRSF_ACCOUNT, f"88216000000{n}",
               3.0 + 0.5 * n + (0.5 if n >= 3 else 0), 30_000, "cut" if n < 3 else "denied", "6666")
      for n in range(5)),
    DemoCall(f"zoe (EUR), customer of reseller {RESELLER} (USD, {RESELLER_BALANCE} left)", RESELLER_CUSTOMER,
             "33142685302", 0.4, 10_000, "cut", "1008"),
)


def free_port() -> int:
    """A TCP port free on the loopback now (the simulated Asterisk must know the AGI port first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_database(url: str, folder: Path) -> Engine:
    """Schema, the demo deck and the demo accounts."""
    engine = make_engine(url)
    upgrade(engine)
    deck = folder / "demo-rates.csv"
    deck.write_text(DEMO_DECK)
    sessions = session_factory(engine)
    import_deck(sessions, deck, PLAN, create_missing_plan=True, currency="EUR")
    with transaction(sessions) as session:
        for account in ACCOUNTS:
            create_account(session, account.account_id, plan=PLAN,
                           balance_micros=parse_amount(account.balance), max_concurrent_calls=account.max_calls)
        set_limits(session, CAPPED_ACCOUNT, max_call_cost_micros=parse_amount(CAPPED_MAX_CALL_COST))
        create_bundle(session, BUNDLE)
        grant_bundle(session, BUNDLE_ACCOUNT, BUNDLE.name, reference="demo-bundle")
    _prepare_tenants(sessions, folder)
    return engine


def _prepare_tenants(sessions: Any, folder: Path) -> None:
    """operator > globex (USD) > zoe (EUR): the plans, the tenant and its account, the FX rate."""
    from agent.adapters.sql.fx_rates import set_rate
    from agent.adapters.sql.plans import create_plan
    from agent.adapters.sql.tenants import create_tenant

    with transaction(sessions) as session:
        create_plan(session, "wholesale-usd", currency="USD")
        set_rate(session, "USD", "EUR", "0.9", datetime(2026, 1, 1, tzinfo=UTC))
    for plan, deck in (("wholesale-usd", WHOLESALE_DECK), ("globex-retail", RETAIL_DECK)):
        path = folder / f"{plan}.csv"
        path.write_text(deck)
        if plan == "globex-retail":
            with transaction(sessions) as session:
                create_tenant(session, RESELLER, parent="default", currency="USD", plan="wholesale-usd",
                              balance_micros=parse_amount(RESELLER_BALANCE))
                create_plan(session, plan, currency="USD", tenant=RESELLER)
        import_deck(sessions, path, plan)
    with transaction(sessions) as session:
        create_account(session, RESELLER_CUSTOMER, plan="globex-retail", currency="EUR", tenant=RESELLER,
                       balance_micros=parse_amount("5.00"))


def prepare_carriers(engine: Engine, folder: Path, pbx: str) -> None:
    """The demo's carriers and their buy decks, with trunks the simulated PBX dials."""
    from agent.adapters.sql.carriers import create_carrier

    sessions = session_factory(engine)
    for priority, (name, currency, deck) in enumerate(CARRIERS):
        with transaction(sessions) as session:
            create_carrier(session, name, trunk=f"PJSIP/{name}" if pbx == "asterisk" else f"sofia/gateway/{name}",
                           currency=currency, priority=priority)
        path = folder / f"buy-{name}.csv"
        path.write_text(deck)
        import_deck(sessions, path, "", carrier=name)


def _show_routes(engine: Engine, out: Any) -> bool:
    """Every answered call in euros went to budget first (503) and was carried by the next
    carrier (zoe's, in USD, by transat); the wholesale margin per carrier (cdrs margin --by carrier)."""
    from agent.adapters.cdr.margin import margin_by_route

    with engine.connect() as conn:
        tried = conn.execute(select(func.count()).select_from(CallLeg)
                             .where(CallLeg.peer == DOWN_CARRIER, CallLeg.direction == "outbound")).scalar() or 0
        carriers = conn.execute(select(RatingDecision.carrier).where(RatingDecision.carrier != "")).scalars().all()
    margins = margin_by_route(engine, "carrier")
    for m in margins:
        out.print(f"wholesale: {m.key} carried {m.calls} calls ({m.seconds} s): sold {format_amount(m.revenue_micros)}"
                  f" {m.currency}, bought {format_amount(m.cost_micros)} {m.currency}, margin "
                  f"{format_amount(m.margin_micros)} {m.currency}")
    out.print(f"wholesale: {tried} attempts on {DOWN_CARRIER} answered 503 (a leg of each call), the next carrier "
              "took the call (billing-agent cdrs margin --by carrier; cdrs show CALL names the carrier)")
    in_euros = [c for c in carriers if c != "transat"]  # budget sells in EUR: the USD call never tries it
    good = bool(in_euros) and DOWN_CARRIER not in carriers and "premium" not in carriers and tried >= len(in_euros)
    if not good:
        out.print(f"[red]expected every call tried on {DOWN_CARRIER} first and carried by another carrier, "
                  f"found {sorted(set(carriers))} after {tried} attempts")
    return good


def _show_tenants(engine: Engine, out: Any) -> bool:
    """zoe's call at each level of its chain, and globex's margin (billing-agent cdrs margin --by tenant)."""
    from agent.adapters.cdr.margin import margin_by_tenant

    with engine.connect() as conn:
        rows = conn.execute(
            select(RatingDecision.level, RatingDecision.account_id, RatingDecision.tenant,
                   RatingDecision.billed_seconds, RatingDecision.cost_micros, RatingDecision.currency,
                   RatingDecision.plan_cost_micros, RatingDecision.plan_currency, Call.account_id)
            .join(Call, Call.id == func.coalesce(RatingDecision.of_call_id, RatingDecision.call_id))
            .where(Call.account_id == RESELLER_CUSTOMER).order_by(RatingDecision.level)).all()
    for level, account, seller, billed, cost, currency, plan_cost, plan_currency, customer in rows:
        who = customer if level == 0 else account
        whose = "the operator's" if seller == "default" else f"{seller}'s"
        price = f" ({format_amount(plan_cost)} {plan_currency} at {whose} price)" \
            if plan_cost is not None and plan_currency != currency else f" at {whose} price"
        out.print(f"tenants: level {level} {who} paid {format_amount(cost)} {currency} for {billed} s{price}")
    margins = [m for m in margin_by_tenant(engine) if m.tenant == RESELLER]
    for m in margins:
        out.print(f"margin of {m.tenant}: {m.calls} call(s), revenue {format_amount(m.revenue_micros)} {m.currency}, "
                  f"cost {format_amount(m.cost_micros)} {m.currency}, margin {format_amount(m.margin_micros)} "
                  f"{m.currency} (billing-agent cdrs margin --by tenant)")
    # 4 s: zoe 4 x 0.01 USD = 0.04 USD = 0.036 EUR; globex 4 x 0.005 = 0.02 USD, all it had.
    good = ([(r[0], r[3], r[4]) for r in rows] == [(0, 4, 36_000), (1, 4, 20_000)] and len(margins) == 1
            and (margins[0].revenue_micros, margins[0].cost_micros) == (40_000, 20_000))
    if not good:
        out.print(f"[red]expected zoe's call cut at 4 s by {RESELLER}'s money: 0.036 EUR for zoe, 0.02 USD for "
                  f"{RESELLER}")
    return good


def demo_config(folder: Path, pbx: str, agi_port: int, pbx_port: int) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite:///{folder / 'billing-agent.db'}"},
        "node": {"id": "demo"},
        "billing": {"nibble_seconds": 1, "warning_seconds": 0, "hangup_verify_seconds": 2.0},
        "daemon": {"drain_seconds": 10.0, "sweep_seconds": 1.0, "publish_seconds": 1.0},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "cdr": {"spool_dir": str(folder / "spool"), "flush_interval_ms": 200},
        "logging": {"level": "info", "format": "text"},
    }
    if pbx == "asterisk":
        overrides["asterisk"] = {"enabled": True, "agi_host": "127.0.0.1", "agi_port": agi_port,
                                 "ami_host": "127.0.0.1", "ami_port": pbx_port, "ami_username": "billing",
                                 "ami_secret": "demo-secret"}
    else:
        overrides["freeswitch"] = {"enabled": True, "host": "127.0.0.1", "port": pbx_port, "password": "ClueCon",
                                   "authorize_host": "127.0.0.1", "authorize_port": agi_port}
    return load_config(None, environ={}, overrides=overrides, cwd=folder)


# ------------------------------------------------------------------ the simulated PBX


class SimulatedPbx:
    """The fake Asterisk or FreeSWITCH, started before the daemon so that its port is known."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.agi_port = free_port()  # where the PBX reaches the agent: FastAGI, or FreeSWITCH's socket app
        self.fake: Any
        if kind == "asterisk":
            from agent.sim.asterisk import FakeAsterisk

            self.fake = FakeAsterisk("127.0.0.1", self.agi_port, ami_port=0, ami_username="billing",
                                     ami_secret="demo-secret").start()
            self.port = int(self.fake.ami_port)
        else:
            from agent.sim.freeswitch import FakeFreeswitch

            self.fake = FakeFreeswitch(port=0, heartbeat_s=5.0, authorize_port=self.agi_port).start()
            self.port = int(self.fake.port)

    def congest(self, trunk: str) -> None:
        """The carrier behind ``trunk`` answers every call 503 (its routes go to the next)."""
        if self.kind == "asterisk":
            self.fake.congested_trunks.add(trunk)
        else:
            self.fake.failing_gateways[trunk] = "NORMAL_CIRCUIT_CONGESTION"

    def place(self, call: DemoCall) -> Any:
        return self.fake.place_call(call.account, call.destination, caller=call.caller, answer_after_ms=300,
                                    talk_ms=call.talk_ms)

    def stop(self) -> None:
        self.fake.stop()


def _outcome(call: DemoCall, handle: Any) -> str:
    """Normalise what the fakes report to answered | cut | denied | other."""
    outcome = str(getattr(handle, "outcome", ""))
    if outcome in ("denied", "refused"):
        return "denied"
    talk_us = getattr(handle, "talk_us", None)  # the fake FreeSWITCH: a cut call talked less than scripted
    if outcome == "answered" and isinstance(talk_us, int) and talk_us < (call.talk_ms - 500) * 1000:
        return "cut"
    return outcome


# ------------------------------------------------------------------ showing it


class EventLog(logging.Handler):
    """Keeps the last decisions and money movements for the live view."""

    def __init__(self, size: int = 10) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=size)
        self.all: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith("agent.services.engine") and message.split(" ", 1)[0] in (
                "authorize", "cut", "settled", "operator"):
            line = time.strftime("%H:%M:%S ", time.localtime(record.created)) + message
            self.lines.append(line)
            self.all.append(line)
        elif record.levelno >= logging.WARNING:
            line = f"{record.levelname} {record.name}: {message}"
            self.lines.append(line)
            self.all.append(line)


@dataclass
class View:
    daemon: Any
    events: EventLog
    started: float = field(default_factory=time.monotonic)

    def table(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        calls = Table(title=f"live calls (t = {time.monotonic() - self.started:4.1f} s)", expand=False)
        for column in ("call", "account", "destination", "state", "answered", "spent", "budget", "cut at"):
            calls.add_column(column, justify="right" if column in ("answered", "spent", "budget") else "left")
        for c in sorted(self.daemon.live_call_dicts(), key=lambda c: c["call_id"]):
            cut = f"+{(c['cut_at_ms'] - self.daemon.clock.now_ms()) / 1000:.1f}s" if c["cut_at_ms"] else ""
            calls.add_row(c["call_id"][-18:], c["account"], c["destination"], c["phase"],
                          f"{c['answered_seconds']} s", format_amount(c["spent_micros"]),
                          format_amount(c["budget_micros"]), cut)
        balances = Table(title="balances (shared store)", expand=False)
        for column in ("account", "balance", "reserved", "available"):
            balances.add_column(column, justify="right")
        for account in ACCOUNTS:
            try:
                state = self.daemon.store.account_state(account.account_id)
                balances.add_row(account.account_id, format_amount(state.balance_micros),
                                 format_amount(state.reserved_micros), format_amount(state.available_micros))
            except Exception as exc:  # the view never stops the demo
                logging.getLogger(__name__).warning("balance of %s: %s", account.account_id, exc, exc_info=True)
                balances.add_row(account.account_id, f"({exc.__class__.__name__})", "", "")
        return Group(calls, balances, "\n".join(self.events.lines))


def _show_results(engine: Engine, handles: list[tuple[DemoCall, Any]], out: Any) -> bool:
    from rich.table import Table

    ok = True
    outcomes = Table(title="calls: expected and seen")
    for column in ("call", "expected", "seen", "PBX says"):
        outcomes.add_column(column)
    for call, handle in handles:
        seen = _outcome(call, handle)
        good = seen == call.expect
        ok = ok and good
        detail = getattr(handle, "reason", "") or getattr(handle, "hangup_cause", "") or ""
        outcomes.add_row(call.label, call.expect, ("" if good else "[red]") + seen, str(detail))
    out.print(outcomes)

    cdrs = Table(title="CDRs in SQL (calls + rating_decisions)")
    for column in ("account", "destination", "disposition", "billed s", "bundle s", "cost", "hangup cause"):
        cdrs.add_column(column, justify="right" if column in ("billed s", "bundle s", "cost") else "left",
                        no_wrap=True)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Call.id, Call.account_id, Call.destination, Call.disposition, RatingDecision.billed_seconds,
                   RatingDecision.cost_micros, Call.hangup_cause, RatingDecision.bundle_seconds)
            .join(RatingDecision, RatingDecision.call_id == Call.id).order_by(Call.started_at)).all()
    for row in rows:
        cdrs.add_row(row[1], row[2], row[3], str(row[4]), str(row[7]), format_amount(row[5]), row[6])
    out.print(cdrs)
    ok = _show_fraud(engine, out) and ok
    ok = _show_bundle(engine, [r for r in rows if r[1] == BUNDLE_ACCOUNT], out) and ok
    ok = _show_cap([r for r in rows if r[1] == CAPPED_ACCOUNT], out) and ok
    ok = _show_tenants(engine, out) and ok
    ok = _show_routes(engine, out) and ok
    answered = sum(1 for call, _ in handles if call.expect != "denied")
    if len(rows) != answered:
        out.print(f"[red]expected {answered} CDRs, found {len(rows)}")
        ok = False

    with transaction(session_factory(engine)) as session:
        report = check_ledger(session, now=utcnow(), grace=timedelta(seconds=0))
        bundles = check_bundles(session, report)
    if report.ok:
        out.print(f"ledger check: OK ({report.accounts} accounts, {report.settled_calls} settled calls, "
                  f"{report.charges} charges; every balance is the sum of its ledger, no reservation left; "
                  f"{bundles.periods} bundle period(s) equal to their {bundles.usage_rows} usage rows)")
    else:
        ok = False
        out.print(f"[red]ledger check: {report.problem_count} problems")
        for p in report.problems:
            out.print(f"  {p.account} {p.call or ''}: {p.problem} {p.detail}")
    return ok


def _show_bundle(engine: Engine, rows: list[Any], out: Any) -> bool:
    """Dave's call: bundle seconds first, then money at the rate (DESIGN §9), and what his bundle has left."""
    with transaction(session_factory(engine)) as session:
        _, timezone = account_timezone(session, BUNDLE_ACCOUNT)
        grants = account_grants(session, BUNDLE_ACCOUNT)
        periods = sql_periods(session, BUNDLE_ACCOUNT)
    if len(rows) != 1 or len(grants) != 1:
        out.print(f"[red]expected one call of {BUNDLE_ACCOUNT} and one bundle grant, found {len(rows)} and "
                  f"{len(grants)}")
        return False
    billed, cost, covered = int(rows[0][4]), int(rows[0][5]), int(rows[0][7])
    figures = grant_figures(grants[0].grant, timezone, utcnow_ms(), periods)
    rate = 300_000  # 0.30 per minute to 44 in the demo deck: the money of the seconds beyond the bundle
    out.print(f"bundle: {BUNDLE_ACCOUNT}'s call to the UK billed {billed} s: {covered} s from bundle {BUNDLE.name} "
              f"({BUNDLE.seconds} s), then {billed - covered} s of money at 0.30/min = {format_amount(cost)} EUR, "
              f"no connect fee (a bundle covered the call); bundle now: granted {figures.granted_s} s, used "
              f"{figures.used_s} s, left {figures.left_s} s (billing-agent bundles show {BUNDLE_ACCOUNT})")
    good = (covered == BUNDLE.seconds and billed > covered and cost == -(-rate * (billed - covered) // 60)
            and (figures.used_s, figures.left_s) == (BUNDLE.seconds, 0))
    if not good:
        out.print(f"[red]expected {BUNDLE.seconds} s from the bundle, then money for the rest, and the bundle used up")
    return good


def _show_cap(rows: list[Any], out: Any) -> bool:
    """Erin's call: cut the instant its cost reached her max call cost, her money untouched beyond it."""
    cap = parse_amount(CAPPED_MAX_CALL_COST)
    if len(rows) != 1:
        out.print(f"[red]expected one call of {CAPPED_ACCOUNT}, found {len(rows)}")
        return False
    billed, cost = rows[0][4], rows[0][5]
    out.print(f"spend cap: {CAPPED_ACCOUNT}'s call cut at {billed} s, cost {format_amount(cost)} = her max call cost "
              f"{CAPPED_MAX_CALL_COST} (billing-agent limits show {CAPPED_ACCOUNT}), with 5.00 of money")
    if cost != cap:
        out.print(f"[red]expected the call to cost exactly the cap {CAPPED_MAX_CALL_COST}")
        return False
    return True


def utcnow_ms() -> int:
    return int(utcnow().timestamp() * 1000)


def _show_fraud(engine: Engine, out: Any) -> bool:
    """The alert the IRSF burst raised and the suspension it caused, as an operator sees them."""
    from agent.adapters.sql.accounts import view_account
    from agent.adapters.sql.fraud import list_alerts

    alerts = list_alerts(engine)
    for alert in alerts:
        out.print(f"fraud alert {alert.id}: account {alert.account_id}, rule {alert.rule}, {alert.detail}, "
                  f"action {alert.action} (billing-agent alerts list)")
    with transaction(session_factory(engine)) as session:
        account = view_account(session, IRSF_ACCOUNT)
    at = account.suspended_at.strftime("%H:%M:%S") if account.suspended_at else "-"
    out.print(f"account {account.id}: {account.status}, by rule {account.suspended_by_rule} at {at} UTC "
              "(billing-agent accounts show; `accounts resume` lifts it)")
    good = ([(a.account_id, a.rule, a.action) for a in alerts] == [(IRSF_ACCOUNT, "irsf_parallel", "suspend")]
            and account.status == "suspended" and account.suspended_by_rule == "irsf_parallel")
    if not good:
        out.print("[red]expected one irsf_parallel alert and the account suspended by it")
    return good


# ------------------------------------------------------------------ the command


@click.command("demo")
@click.option("--pbx", type=click.Choice(["asterisk", "freeswitch"]), default="asterisk", show_default=True,
              help="Which simulated PBX the daemon talks to.")
@click.option("--keep", is_flag=True, help="Keep the temporary folder (database, spool, log) and print its path.")
def demo_command(pbx: str, keep: bool) -> None:
    """See the product work: real daemon, simulated PBX on loopback, a few calls (about 20 s)."""
    from rich.console import Console
    from rich.live import Live

    from agent.daemon import Daemon, StartupError, configure_logging

    out = Console()
    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="billing-agent-demo-"))
    pbx_sim: SimulatedPbx | None = None
    daemon: Daemon | None = None
    ok = False
    try:
        configure_logging("warning", "text")
        log_file = logging.FileHandler(folder / "agent.log")
        log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log_file.setLevel(logging.INFO)
        events = EventLog()
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.handlers[0].setLevel(logging.ERROR)  # the console shows the live view, the file has it all
        root.addHandler(log_file)
        root.addHandler(events)

        out.print(f"[bold]billing-agent demo[/bold]: temporary folder {folder}")
        sql = prepare_database(f"sqlite:///{folder / 'billing-agent.db'}", folder)
        prepare_carriers(sql, folder, pbx)
        sql.dispose()
        out.print(f"  database: SQLite, schema at head, demo rate deck imported into plan '{PLAN}', accounts "
                  + ", ".join(f"{a.account_id} {a.balance} EUR" for a in ACCOUNTS))
        out.print("  carriers: " + ", ".join(f"{name} ({currency})" for name, currency, _ in CARRIERS)
                  + f"; {DOWN_CARRIER} is the cheapest and answers 503: every call fails over to the next")
        pbx_sim = SimulatedPbx(pbx)
        pbx_sim.congest(DOWN_CARRIER)
        rules = folder / "fraud-rules.yaml"
        rules.write_text(DEMO_RULES)
        config = dataclasses.replace(demo_config(folder, pbx, pbx_sim.agi_port, pbx_sim.port),
                                     fraud=FraudConfig(rules_file=str(rules)))
        out.print(f"  fraud rule: a 4th live call of one account to the high-risk group ({rules.name}) suspends it")
        daemon = Daemon(config)
        started = time.monotonic()
        daemon.start()
        out.print(f"  daemon ready in {time.monotonic() - started:.2f} s: {pbx} adapter, embedded SQL balance store, "
                  f"health at {daemon.status_url}/health")
        if pbx == "asterisk":
            out.print(f"  simulated Asterisk: FastAGI client -> 127.0.0.1:{pbx_sim.agi_port}, "
                      f"AMI server on 127.0.0.1:{pbx_sim.port}")
        else:
            out.print(f"  simulated FreeSWITCH: event socket on 127.0.0.1:{pbx_sim.port}")
        _wait_connected(daemon)

        handles: list[tuple[DemoCall, Any]] = []
        view = View(daemon, events)
        t0 = time.monotonic()
        pending = list(CALLS)
        with Live(view.table(), console=out, refresh_per_second=4, transient=False) as live:
            deadline = t0 + 45
            while time.monotonic() < deadline:
                now = time.monotonic() - t0
                while pending and pending[0].start_after_s <= now:
                    call = pending.pop(0)
                    handles.append((call, pbx_sim.place(call)))
                live.update(view.table())
                if not pending and all(h.done.is_set() for _, h in handles) and not daemon.live_call_dicts():
                    break
                gevent.sleep(0.25)
            live.update(view.table())
        took = daemon.shutdown()
        out.print(f"  daemon stopped in {took:.1f} s (CDRs flushed, reservations closed)")
        sql = make_engine(config.database.url)
        try:
            ok = _show_results(sql, handles, out)
        finally:
            sql.dispose()
    except StartupError as exc:
        out.print(f"[red]the daemon could not start: {exc}")
    finally:
        if daemon is not None and not daemon.stopped.is_set():
            daemon.shutdown()
        if pbx_sim is not None:
            pbx_sim.stop()
        for handler in list(logging.getLogger().handlers):
            if isinstance(handler, logging.FileHandler):
                handler.close()
                logging.getLogger().removeHandler(handler)
        if keep:
            out.print(f"kept {folder} (agent.log has every decision and money movement)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    out.print(f"demo {'passed' if ok else '[red]FAILED[/red]'} in {time.monotonic() - began:.1f} s")
    sys.exit(0 if ok else 1)


def _wait_connected(daemon: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(a.connected() for a in daemon.adapters):
            return
        gevent.sleep(0.05)
    raise click.ClickException("the simulated PBX did not connect to the daemon within 10 s")
