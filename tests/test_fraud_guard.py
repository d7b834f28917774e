"""Fraud rules in the engine's authorize path: an IRSF burst is refused, the account suspended and
its live calls cut; alerts and the suspension reach SQL off the call path, also after the
database was away. The engine runs with an in-memory store and a fake switch; the SQL side runs on
SQLite, PostgreSQL and MariaDB; the CLI shows what the operator sees."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import gevent
import gevent.event
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from agent.adapters.fraud_rules_file import load_rules
from agent.adapters.redis.counters import RedisFraudCounters
from agent.adapters.sql import accounts as repo
from agent.adapters.sql.engine import session_factory, transaction
from agent.adapters.sql.fraud import SqlFraudActions
from agent.adapters.sql.models import CallCommand, LiveCallRow, utcnow
from agent.adapters.sql.plans import create_plan
from agent.cli.main import cli
from agent.core.events import AuthorizeRequest, DenyReason, Direction, LegAnswered, LegCreated, LegHungUp
from agent.core.fraud import AlertRecord
from agent.core.fraud_rules import RuleSet
from agent.core.rating import RateRow
from agent.core.session import RatedCall, RatingInfo
from agent.services.clock import SystemClock
from agent.services.engine import Engine as CallEngine
from agent.services.engine import EngineSettings
from agent.services.fraud import FraudGuard
from agent.services.metrics import Metrics
from agent.sim.memory_store import MemoryStore
from tests.cdr_builders import make_record

RULES = """
groups:
  premium: {prefixes: ["882", "+53"]}
rules:
  - {name: irsf_parallel, kind: live_calls, group: premium, threshold: 3, action: suspend}
  - {name: cps, kind: new_calls, window_s: 1, threshold: 50, action: deny}
"""


class Rater:
    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        return RatedCall(RateRow(prefix="", destination="any", rate_micros=60_000), RatingInfo("retail", 1, "", 60_000))


class Switch:
    name = "asterisk"

    def __init__(self, engine: CallEngine, clock: SystemClock) -> None:
        self.engine, self.clock = engine, clock
        self.hangups: list[str] = []

    def hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING", *, escalate: bool = False) -> None:
        self.hangups.append(leg_id)
        self.engine.on_event(LegHungUp(leg_id, self.clock.now_ms(), cause="NORMAL_CLEARING"))

    def warn(self, leg_id: str, seconds_left: int) -> None:
        pass

    def arm_backstop(self, leg_id: str, at_ms: int, caller_leg_id: str = "") -> None:
        pass

    def connected(self) -> bool:
        return True


class Actions:
    """FraudActions in memory; ``down`` makes every write fail as a database away would."""

    def __init__(self) -> None:
        self.alerts: list[AlertRecord] = []
        self.suspended: list[tuple[str, str]] = []
        self.down = False

    def record_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        if self.down:
            raise OSError("database away")
        self.alerts.extend(alerts)

    def suspend(self, account_id: str, rule: str, at_ms: int) -> bool:
        if self.down:
            raise OSError("database away")
        self.suspended.append((account_id, rule))
        return True

    def cut_elsewhere(self, account_id: str, node: str, reason: str) -> list[str]:
        return []


class Cdrs:
    def __init__(self) -> None:
        self.records: list[object] = []

    def submit(self, record: object) -> None:
        self.records.append(record)


def rules(tmp_path: Path, text: str = RULES) -> RuleSet:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load_rules(path)


@pytest.fixture(params=["memory", "redis"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[CallEngine, FraudGuard, MemoryStore,
                                                                          Switch, Actions]]:
    """The engine with the fraud screen; counters in memory, or in Redis (updates by a worker)."""
    counters = None
    if request.param == "redis":
        counters = RedisFraudCounters(request.getfixturevalue("redis_client"),
                                      key_prefix=request.getfixturevalue("redis_prefix"))
    clock = SystemClock()
    store = MemoryStore()
    metrics = Metrics()
    engine = CallEngine(settings=EngineSettings(node="n1", nibble_seconds=6), store=store, rater=Rater(),
                        clock=clock, cdr=Cdrs(), metrics=metrics)
    switch = Switch(engine, clock)
    engine.add_switch(switch)
    actions = Actions()
    guard = FraudGuard(rules(tmp_path), node="n1", actions=actions, clock=clock, metrics=metrics, counters=counters)
    guard.cut_local = engine.cut_account
    engine.screens.append(guard)
    engine.on_finished.append(guard.finished)
    engine.start()
    guard.start()
    yield engine, guard, store, switch, actions
    guard.stop(1)
    engine.stop(1)


def wait(predicate: object, timeout: float = 5.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():  # type: ignore[operator]
            gevent.sleep(0.01)


def call(engine: CallEngine, n: int, account: str, number: str) -> AuthorizeRequest:
    return AuthorizeRequest("asterisk", f"A{n}", account, number, engine.clock.now_ms())


def answer(engine: CallEngine, n: int) -> None:
    now = engine.clock.now_ms()
    engine.on_event(LegCreated(f"B{n}", now, Direction.OUTBOUND, parent_leg_id=f"A{n}"))
    engine.on_event(LegAnswered(f"B{n}", now))


def test_irsf_burst_suspends_the_account_and_cuts_its_live_calls(rig) -> None:
    engine, guard, store, switch, actions = rig
    store.add_account("victim", 100_000_000)
    store.add_account("neighbour", 100_000_000)
    for n in range(3):
        assert engine.authorize(call(engine, n, "victim", "+88212345")).allowed
        answer(engine, n)
    assert engine.authorize(call(engine, 9, "victim", "+33140000000")).allowed  # not premium: not counted
    answer(engine, 9)
    assert engine.authorize(call(engine, 20, "neighbour", "+88212345")).allowed  # its own counters
    fourth = engine.authorize(call(engine, 3, "victim", "00882999"))
    assert not fourth.allowed and fourth.reason is DenyReason.FRAUD_RULE
    assert "irsf_parallel" in fourth.detail and "4 > 3" in fourth.detail
    # Every live call of the account is cut, the premium ones and the other one; the neighbour's stays.
    wait(lambda: {"A0", "B0", "A1", "B1", "A2", "B2", "A9", "B9"} <= set(switch.hangups))
    later = engine.authorize(call(engine, 4, "victim", "+33140000000"))
    assert not later.allowed and later.reason is DenyReason.FRAUD_RULE and "suspended" in later.detail
    wait(lambda: actions.suspended == [("victim", "irsf_parallel")] and actions.alerts)
    (alert,) = actions.alerts
    assert (alert.account_id, alert.rule, alert.figure, alert.threshold, alert.action) == \
        ("victim", "irsf_parallel", 4, 3, "suspend")
    assert engine.metrics.fraud_alerts.labels("irsf_parallel", "suspend")._value.get() == 1
    wait(lambda: engine.live_calls() == 1)  # the neighbour's call
    assert not {"A20", "B20"} & set(switch.hangups)


def test_a_call_denied_by_the_store_frees_its_live_slot(rig) -> None:
    engine, guard, store, switch, actions = rig
    store.add_account("poor", 0)
    for n in range(5):  # refused for money: never live, never counted towards irsf_parallel
        decision = engine.authorize(call(engine, n, "poor", "+88212345"))
        assert decision.reason is DenyReason.INSUFFICIENT_FUNDS
        gevent.sleep(0.02)  # with Redis counters, the worker takes the refused call out of the live set
    assert actions.alerts == [] and guard.suspended == {}


def test_alerts_wait_for_the_database_and_are_written_once(rig, tmp_path: Path) -> None:
    engine, guard, store, switch, actions = rig
    actions.down = True
    store.add_account("victim", 100_000_000)
    for n in range(4):
        engine.authorize(call(engine, n, "victim", "+5371234"))
    gevent.sleep(0.1)
    assert guard.queued() == 1 and guard.alerts.queued() == 1 and actions.alerts == []  # the suspension, its alert
    actions.down = False
    assert guard.flush_once() and guard.alerts.flush_once()
    assert [a.rule for a in actions.alerts] == ["irsf_parallel"] and actions.suspended == [("victim", "irsf_parallel")]
    assert guard.queued() == 0 and guard.alerts.queued() == 0


def test_rules_replaced_on_reload_apply_to_the_next_call(rig, tmp_path: Path) -> None:
    engine, guard, store, switch, actions = rig
    store.add_account("a", 100_000_000)
    assert engine.authorize(call(engine, 1, "a", "+33140")).allowed
    guard.replace_rules(rules(tmp_path, "rules:\n  - {name: none, kind: new_calls, window_s: 60, threshold: 0, "
                                        "action: deny}\n"))
    refused = engine.authorize(call(engine, 2, "a", "+33140"))
    assert not refused.allowed and "fraud rule none" in refused.detail


# ---------------------------------------------------------------- SQL and the CLI


def run(engine: Engine, *args: str) -> tuple[int, str]:
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["--database-url", url, *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_suspension_alerts_and_remote_hangups_in_sql(engine: Engine) -> None:
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        create_plan(s, "retail", currency="EUR")
        repo.create_account(s, "victim", plan="retail", balance_micros=5_000_000)
        now = utcnow()
        for call_id, node in (("n1-a", "n1"), ("n2-b", "n2"), ("n3-c", "n3")):
            s.add(LiveCallRow(call_id=call_id, node=node, account_id="victim", authorized_at=now))
        s.add(LiveCallRow(call_id="n2-other", node="n2", account_id="someone", authorized_at=now))
    refreshed: list[str] = []
    actions = SqlFraudActions(engine, refresh=refreshed.append)
    at_ms = 1_780_000_000_000
    assert actions.suspend("victim", "irsf_parallel", at_ms)
    assert not actions.suspend("victim", "irsf_parallel", at_ms)  # already suspended: said so
    assert refreshed == ["victim", "victim"]  # pushed to the store again on a retry
    assert not actions.suspend("ghost", "irsf_parallel", at_ms)
    assert sorted(actions.cut_elsewhere("victim", "n1", "account suspended by fraud rule irsf_parallel")) == \
        ["n2-b", "n3-c"]
    with transaction(sessions) as s:
        commands = s.execute(select(CallCommand.call_id, CallCommand.node, CallCommand.reason)).all()
    assert sorted(c[:2] for c in commands) == [("n2-b", "n2"), ("n3-c", "n3")]
    actions.record_alerts([
        AlertRecord(at_ms, "n1", "victim", "irsf_parallel", "live_calls", 4, 3, 0, "suspend", "n1-x", "88212",
                    "live_calls to premium = 4 > 3"),
        AlertRecord(at_ms + 1, "n1", "deleted-account", "spend_velocity", "spend", 51_000_000, 50_000_000, 3600,
                    "alert")])

    code, out = run(engine, "accounts", "show", "victim", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["status"] == "suspended" and shown["suspended_by_rule"] == "irsf_parallel"
    assert shown["suspended_at"].startswith("2026-05-28T")
    code, out = run(engine, "accounts", "show", "victim")
    assert "suspended by rule     irsf_parallel" in out and "suspended at          2026-05-28T20:26:40" in out

    code, out = run(engine, "alerts", "list", "--json")
    listed = json.loads(out)
    assert [(a["account"], a["rule"], a["figure"], a["threshold"], a["action"]) for a in listed] == [
        ("victim", "irsf_parallel", 4, 3, "suspend"),
        ("deleted-account", "spend_velocity", "51.000000", "50.000000", "alert")]
    first = listed[0]["id"]
    code, out = run(engine, "alerts", "list", "--since", "2026-05-28T20:26:40.001Z", "--json")
    assert [a["rule"] for a in json.loads(out)] == ["spend_velocity"]
    assert run(engine, "alerts", "ack", str(first)) == (0, f"alert {first} acknowledged\n")
    code, out = run(engine, "alerts", "ack", str(first))
    assert code == 0 and "already acknowledged" in out
    code, out = run(engine, "alerts", "list", "--unacked", "--json")
    assert [a["rule"] for a in json.loads(out)] == ["spend_velocity"]
    code, out = run(engine, "alerts", "ack", "99999")
    assert code == 1 and "no alert 99999" in out

    run(engine, "accounts", "resume", "victim")
    code, out = run(engine, "accounts", "show", "victim", "--json")
    assert json.loads(out)["suspended_by_rule"] is None and json.loads(out)["status"] == "active"


def test_rules_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(RULES)
    result = CliRunner().invoke(cli, ["fraud", "rules", "check", str(good)])
    assert result.exit_code == 0 and "OK, 2 rules" in result.output
    assert "rule irsf_parallel: live_calls to premium > 3 -> suspend" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: x, kind: live_calls, threshold: 1, action: explode}\n")
    result = CliRunner().invoke(cli, ["fraud", "rules", "check", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2: key action: unknown action 'explode' (expected alert, deny or suspend)" in result.output


class BrokenCounters:
    """Shared counters whose Redis is away."""

    shared = True

    def set_rules(self, rules: RuleSet) -> None:
        pass

    def observe(self, facts: object) -> dict[str, int]:
        raise ConnectionError("redis is away")

    def observe_rider(self, facts: object) -> None:
        return None  # nothing rides: the guard observes on its own round trip, which fails

    def forget(self, account_id: str, call_id: str) -> None:
        raise ConnectionError("redis is away")

    def ended(self, *args: object) -> None:
        raise ConnectionError("redis is away")


def test_counters_that_fail_let_calls_through_to_the_store_and_say_so(tmp_path: Path) -> None:
    clock = SystemClock()
    store = MemoryStore()
    store.add_account("a", 100_000_000)
    metrics = Metrics()
    engine = CallEngine(settings=EngineSettings(node="n1"), store=store, rater=Rater(), clock=clock, cdr=Cdrs(),
                        metrics=metrics)
    guard = FraudGuard(rules(tmp_path), node="n1", actions=Actions(), clock=clock, metrics=metrics,
                       counters=BrokenCounters())
    engine.screens.append(guard)
    try:
        assert all(engine.authorize(call(engine, n, "a", "+88212345")).allowed for n in range(5))
        assert metrics.alerts.labels("fraud_counters_unavailable")._value.get() == 5
    finally:
        engine.stop(1)


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_spend_velocity_suspends_at_the_settle_that_crosses_it(where: str, request: pytest.FixtureRequest,
                                                                 tmp_path: Path) -> None:
    counters = None
    if where == "redis":
        counters = RedisFraudCounters(request.getfixturevalue("redis_client"),
                                      key_prefix=request.getfixturevalue("redis_prefix"))
    actions = Actions()
    guard = FraudGuard(rules(tmp_path, 'rules:\n  - {name: velocity, kind: spend, window_s: 3600, threshold: "1.00", '
                                       'action: suspend}\n'), node="n1", actions=actions, clock=SystemClock(),
                       counters=counters)
    cuts: list[tuple[str, str]] = []
    guard.cut_local = lambda account, reason: cuts.append((account, reason)) or ["n1-live"]  # type: ignore[func-returns-value]
    guard.start()
    try:
        guard.finished(make_record(1, account_id="a", cost_micros=600_000))
        gevent.sleep(0.05)
        assert cuts == [] and guard.suspended == {}  # 0.60 spent: under 1.00
        guard.finished(make_record(2, account_id="a", cost_micros=600_000))
        wait(lambda: cuts)  # 1.20: the settle that crossed it suspends the account and cuts its calls now
        assert cuts == [("a", "account suspended by fraud rule velocity")]
        wait(lambda: actions.suspended == [("a", "velocity")])
        (alert,) = actions.alerts
        assert (alert.rule, alert.figure, alert.threshold, alert.action) == ("velocity", 1_200_000, 1_000_000,
                                                                              "suspend")
        refused = guard.screen(AuthorizeRequest("asterisk", "L9", "a", "+3314", 0), "n1-L9", 0)
        assert refused is not None and refused.reason is DenyReason.FRAUD_RULE
    finally:
        guard.stop(1)


class RidingCounters:
    """Shared counters (as Redis is) whose observe rides in the store's round trip: the rider
    queues a command on a store that talks to the same server (``server``), the store runs it
    and answers. Counts the observes made on their own round trip."""

    shared = True

    def __init__(self, rules: RuleSet, server: object) -> None:
        from agent.core.fraud import LocalCounters

        self.local = LocalCounters(rules)
        self.server = server
        self.own_trips = 0
        self.carried = 0

    def set_rules(self, rules: RuleSet) -> None:
        self.local.set_rules(rules)

    def observe(self, facts: object) -> dict[str, int]:
        self.own_trips += 1
        return self.local.observe(facts)  # type: ignore[arg-type]

    def observe_rider(self, facts: object) -> Rider:
        return Rider(self, facts)

    def forget(self, account_id: str, call_id: str) -> None:
        self.local.forget(account_id, call_id)

    def ended(self, *args: object) -> dict[str, int]:
        return self.local.ended(*args)  # type: ignore[arg-type]


class Rider:
    def __init__(self, counters: RidingCounters, facts: object) -> None:
        self.counters, self.facts = counters, facts
        self.reply: object = None

    def queue(self, client: object, pipeline: list[object]) -> bool:
        if client is not self.counters.server:
            return False

        def run() -> dict[str, int]:
            self.counters.carried += 1
            return self.counters.local.observe(self.facts)  # type: ignore[arg-type]

        pipeline.append(run)
        return True

    def answer(self, reply: object) -> None:
        self.reply = reply

    def figures(self) -> dict[str, int] | None:
        return self.reply if isinstance(self.reply, dict) else None


class CarryingStore(MemoryStore):
    """The in-memory store with a "server" of its own: a rider for that server goes in its
    authorize's "pipeline" and is answered, as the Redis store does with the fraud counters'
    observe (one round trip for both)."""

    def __init__(self, server: object) -> None:
        super().__init__()
        self.server = server
        self.asked = 0

    def authorize(self, *args: object, rider: object = None, **kwargs: object):  # type: ignore[no-untyped-def]
        self.asked += 1
        pipeline: list[object] = []
        if rider is not None and rider.queue(self.server, pipeline):  # type: ignore[attr-defined]
            rider.answer(pipeline[0]())  # type: ignore[attr-defined,operator]
        return super().authorize(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("carried", [True, False], ids=["store-carries-it", "own-round-trip"])
def test_shared_counters_ride_with_the_store_and_a_refusal_gives_the_money_back(tmp_path: Path,
                                                                                carried: bool) -> None:
    """With counters in Redis the screen's observe rides in the store's round trip (the call waits
    for one, not two); a store that cannot carry it (another server, SQL, an open circuit) leaves
    it, and the screen observes on its own after. Either way a call the rules refuse had money
    reserved, which is released: the account ends with its whole balance and no reservation."""
    clock = SystemClock()
    server = object()
    store = CarryingStore(server if carried else object())
    store.add_account("victim", 100_000_000)
    metrics = Metrics()
    engine = CallEngine(settings=EngineSettings(node="n1"), store=store, rater=Rater(), clock=clock, cdr=Cdrs(),
                        metrics=metrics)
    ruleset = rules(tmp_path)
    counters = RidingCounters(ruleset, server)
    engine.add_switch(Switch(engine, clock))
    guard = FraudGuard(ruleset, node="n1", actions=Actions(), clock=clock, metrics=metrics, counters=counters)
    guard.cut_local = engine.cut_account
    assert guard.round_trip
    engine.screens.append(guard)
    engine.start()
    guard.start()
    try:
        for n in range(3):
            assert engine.authorize(call(engine, n, "victim", "+88212345")).allowed
        fourth = engine.authorize(call(engine, 3, "victim", "+88212345"))
        assert not fourth.allowed and fourth.reason is DenyReason.FRAUD_RULE and "irsf_parallel" in fourth.detail
        assert (counters.carried, counters.own_trips) == ((4, 0) if carried else (0, 4))
        asked = store.asked
        fifth = engine.authorize(call(engine, 4, "victim", "+3314"))  # suspended here: refused before the store
        assert not fifth.allowed and "suspended by fraud rule irsf_parallel" in fifth.detail
        assert store.asked == asked and counters.carried + counters.own_trips == 4
        # The refused call's reservation is released; the three allowed ones are cut (suspension)
        # and settle: nothing stays reserved and the refused call cost nothing.
        wait(lambda: store.open_reservations() == 0)
        account = store.accounts["victim"]
        assert (account.reserved_micros, account.balance_micros) == (0, 100_000_000)
        assert "n1-A3" not in engine.registry.sessions
    finally:
        guard.stop(1)
        engine.stop(1)


# ---------------------------------------------------------------- rules limited to tenants (DESIGN §11)

TENANT_RULES = """
groups:
  premium: {prefixes: ["882"]}
rules:
  - {name: acme_premium, kind: new_calls, group: premium, window_s: 60, threshold: 1, action: deny, tenant: acme}
  - {name: everyone_premium, kind: new_calls, group: premium, window_s: 60, threshold: 3, action: deny}
"""


class Tenants:
    """The tenants each account is under, as the daemon's cached chains give them; counts its use."""

    def __init__(self, under: dict[str, frozenset[str]], *, down: bool = False) -> None:
        self.under, self.down, self.asked = under, down, 0

    def __call__(self, account_id: str) -> frozenset[str]:
        self.asked += 1
        if self.down:
            raise OSError("database away and the chain never read")
        return self.under.get(account_id, frozenset({"default"}))


def tenant_guard(tmp_path: Path, tenants: Tenants) -> FraudGuard:
    return FraudGuard(rules(tmp_path, TENANT_RULES), node="n1", actions=Actions(), clock=SystemClock(),
                      tenants_of=tenants)


def screen(guard: FraudGuard, n: int, account: str, number: str = "+88212345") -> str | None:
    decision = guard.screen(AuthorizeRequest("asterisk", f"A{n}", account, number, 0), f"c{n}", 1_000 + n)
    return None if decision is None else decision.detail


def test_a_rule_limited_to_a_tenant_applies_to_its_subtree_only(tmp_path: Path) -> None:
    tenants = Tenants({"acme-customer": frozenset({"default", "acme"}),
                       "sub-customer": frozenset({"default", "acme", "acme-east"}),
                       "globex-customer": frozenset({"default", "globex"})})
    guard = tenant_guard(tmp_path, tenants)
    for account in ("acme-customer", "sub-customer"):  # the second premium call crosses acme's threshold of 1
        assert screen(guard, 1, account) is None
        assert "fraud rule acme_premium" in (screen(guard, 2, account) or "")
    for n, account in enumerate(("globex-customer", "direct"), start=10):  # the operator-wide rule only
        for i in range(3):
            assert screen(guard, n * 10 + i, account) is None
        assert "fraud rule everyone_premium" in (screen(guard, n * 10 + 9, account) or "")


def test_the_tenants_are_looked_up_only_when_a_tenant_rule_crosses_and_a_failed_lookup_leaves_it_out(
        tmp_path: Path) -> None:
    tenants = Tenants({"acme-customer": frozenset({"default", "acme"})})
    guard = tenant_guard(tmp_path, tenants)
    assert screen(guard, 1, "acme-customer") is None
    assert screen(guard, 2, "acme-customer", "+33140000000") is None  # not premium: acme_premium's figure stays 1
    assert tenants.asked == 0, "ordinary calls never ask for the account's tenants"
    tenants.down = True
    assert screen(guard, 3, "acme-customer") is None  # crossed, but whose tenants cannot be told: left out
    assert tenants.asked == 1
    tenants.down = False
    assert "fraud rule acme_premium" in (screen(guard, 4, "acme-customer") or "")


def test_a_tenant_name_is_checked_like_the_other_keys(tmp_path: Path) -> None:
    from agent.adapters.fraud_rules_file import RulesFileError

    ok = rules(tmp_path, "rules:\n  - {name: r, kind: live_calls, threshold: 2, action: alert, tenant: [acme, b.2]}\n")
    assert ok.rules[0].tenants == frozenset({"acme", "b.2"})
    for value, reason in (("'-acme'", "must be a tenant's name"), ("[]", "an empty list"),
                          ("{a: 1}", "must be a tenant's name")):
        with pytest.raises(RulesFileError, match=rf"rules.yaml:3: key tenant: .*{reason}"):
            rules(tmp_path, f"rules:\n  - name: r\n    tenant: {value}\n    kind: live_calls\n    threshold: 2\n"
                            "    action: alert\n")


PER_TENANT_RULES = """
groups:
  premium: {prefixes: ["882"]}
rules:
  - {name: acme_parallel, kind: live_calls, group: premium, threshold: 3, action: deny, tenant: acme, count: tenant}
  - {name: acme_spend, kind: spend, window_s: 3600, threshold: "1.00", action: alert, tenant: acme, count: tenant}
"""


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_a_rule_counting_a_tenant_sees_its_customers_calls_together(where: str, request: pytest.FixtureRequest,
                                                                     tmp_path: Path) -> None:
    """Four customers of acme (one under its sub-reseller) with one premium call each: none is
    over any per-account figure, together they are over acme's 3; globex's customer is not counted."""
    tenant_counters = None
    if where == "redis":
        tenant_counters = RedisFraudCounters(request.getfixturevalue("redis_client"),
                                             key_prefix=request.getfixturevalue("redis_prefix"))
    tenants = Tenants({"a1": frozenset({"default", "acme"}), "a2": frozenset({"default", "acme"}),
                       "a3": frozenset({"default", "acme", "acme-east"}), "a4": frozenset({"default", "acme"}),
                       "g1": frozenset({"default", "globex"})})
    actions = Actions()
    guard = FraudGuard(rules(tmp_path, PER_TENANT_RULES), node="n1", actions=actions, clock=SystemClock(),
                       tenants_of=tenants, tenant_counters=tenant_counters)
    guard.start()
    try:
        for n, account in enumerate(("a1", "a2", "a3", "g1"), start=1):
            assert screen(guard, n, account) is None
        refused = screen(guard, 5, "a4")
        assert refused is not None and "fraud rule acme_parallel" in refused and "4 > 3" in refused
        assert screen(guard, 6, "g1") is None  # globex's calls are not acme's
        assert screen(guard, 7, "a4", "+33140000000") is None  # not premium: the figure stays 3
        # a1's call ends: acme has 2 premium calls live, a4 may call again.
        guard.finished(make_record(1, account_id="a1", call_id="c1", destination="88212345", cost_micros=600_000))
        wait(lambda: screen(guard, 8, "a4") is None)
        # Spend counted per tenant at the settles: 0.60 + 0.50 > 1.00 alerts (a2's settle crossed it).
        guard.finished(make_record(2, account_id="a2", call_id="c2", destination="88212345", cost_micros=500_000))
        wait(lambda: [a.rule for a in guard.alerts.queue.take(10).records if a.rule == "acme_spend"] == ["acme_spend"])
    finally:
        guard.stop(1)


def test_count_tenant_needs_one_tenant_and_does_not_suspend(tmp_path: Path) -> None:
    from agent.adapters.fraud_rules_file import RulesFileError

    for extra, reason in (("count: tenant", "needs exactly one tenant"),
                          ("count: tenant\n    tenant: [a, b]", "needs exactly one tenant"),
                          ("count: everyone\n    tenant: a", "must be account or tenant")):
        with pytest.raises(RulesFileError, match=reason):
            rules(tmp_path, f"rules:\n  - name: r\n    kind: live_calls\n    threshold: 2\n    action: alert\n"
                            f"    {extra}\n")
    with pytest.raises(RulesFileError, match="cannot suspend one account"):
        rules(tmp_path, "rules:\n  - {name: r, kind: live_calls, threshold: 2, action: suspend, tenant: a, "
                        "count: tenant}\n")
