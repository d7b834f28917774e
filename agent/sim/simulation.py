"""Deterministic whole-call simulation: a seeded fake PBX, a fake clock, the real call logic.

It drives the same pure :class:`CallRegistry` and the same authorization decision the daemon
uses, with an in-memory store of the same money semantics, through thousands of calls with
random answers, busy and unanswered calls, forks, transfers, early-answering IVRs, top-ups and
a PBX that sometimes ignores a hangup. After the run it checks the money invariants:

* no overspend: no account ever below -credit_limit when the PBX obeyed the cut;
* conservation: for every account, opening + top-ups - charges = final balance, and the sum of
  the charges equals the sum of the CDR costs;
* exactly one settled CDR per authorized call;
* every cut-off within 1 s of the instant the money ran out;
* no reservation left open.

With ``bundle_share`` some accounts hold one or two free-minute bundles (DESIGN §9) on some of
the simulated prefixes: monthly (some rolling over), weekly, and ``once`` grants valid for part
of the run, read in the account's timezone (zones chosen so that periods roll during a long
run; ``start_ms`` moves the start, so a short run can cross a boundary). The checks then add:

* no bundle period below zero, with negative holds, or with seconds still held at the end;
* every period's used seconds = the sum of what each call committed to it (the store's holds of
  each call at its settle, split in draw order);
* every call is re-rated independently (the §9 formula written out here from the rate row):
  ``covered = min(b, R)`` where ``R`` is what the call held, the money charged is
  ``(covered > 0 ? 0 : connect_fee) + ceil(rate * (b - covered) / 60)``, and the bundle seconds
  the store committed, the CDR's bundle seconds and ``covered`` agree.

With ``irsf_calls`` it adds an IRSF attack at 03:00: a hijacked account opens that many parallel
calls to a premium range (``1900``, 3.00/min), one every ``irsf_interval_ms``, answered at once and
talking ``irsf_talk_s`` each; with ``irsf_rules``
the fraud rule ``irsf_parallel`` (more than ``irsf_threshold`` live calls to the group: suspend)
screens every call as the daemon does (``agent/core/fraud.py``), and the report says what the
attack cost, when the rule fired and how late the account's calls were cut (a violation past 1 s).

With ``tenant_share`` some accounts are customers of resellers (DESIGN §11): a tree operator >
``r1`` > ``r2``, each reseller with a prepaid account of its own (``tenant:r1``, ``tenant:r2``)
and its own prices (the operator's rows marked up per level). A customer of ``r1`` is charged
r1's price and r1 the operator's; a customer of ``r2`` r2's price, r2 r1's, r1 the operator's;
the decision, the nibbles and the settles of every level run as the engine runs them
(``decide`` with ``rate_chain`` and ``authorize_with_levels``). The resellers' money is limited, so a
reseller's own money cuts its customers' calls. The checks then add, per level: every level's
charge equals its own §4 price of the call's duration (written out here), each CDR's upper
decisions equal the store's charges, and the resellers' accounts obey the same conservation and
no-overspend rules as any account.

Run it with ``python -m agent.sim.simulation --calls 100000 --seed 7`` (see bench/).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.core.balance import StoreAuthorization
from agent.core.bundles import BundleDef, BundleGrant, BundleSlot, PeriodKind, check_bundle, slots_for
from agent.core.cdr import CallRecord, Disposition
from agent.core.events import (
    AuthorizeDecision,
    AuthorizeRequest,
    DenyReason,
    DialBegin,
    Direction,
    HangupLeg,
    LegAnswered,
    LegBridged,
    LegCreated,
    LegEvent,
    LegHungUp,
)
from agent.core.fraud import CallFacts, LocalCounters, destination_digits, evaluate
from agent.core.fraud_rules import Action, Rule, RuleKind, RuleSet
from agent.core.rating import RateRow
from agent.core.registry import CallRegistry
from agent.core.session import (
    Alert,
    Command,
    Effect,
    Finished,
    LevelRated,
    NibbleStep,
    RatedCall,
    RatingInfo,
    RatingRefused,
    ReleaseStep,
    SessionSettings,
    SettleStep,
    is_level_call_id,
    level_call_id,
)
from agent.services.authorize import Outcome, decide
from agent.sim.memory_store import MemoryStore, OverspendError

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
IRSF_ACCOUNT = "hijacked"
IRSF_PREFIX = "1900"  # background prefixes start with 20-99: never in this group
# Accounts with bundles read their periods in one of these zones: local midnight of 2026-01-01
# (a month anchored on day 1, a week anchored on Thursday) falls 0-4 h after START_MS.
BUNDLE_ZONES = ("UTC", "Atlantic/Azores", "America/Noronha", "America/Sao_Paulo", "America/Halifax")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 1
    calls: int = 1_000
    accounts: int = 40
    nibble_seconds: int = 6
    warning_seconds: int = 0
    verify_ms: int = 3_000
    mean_interarrival_ms: int = 150
    mean_talk_s: int = 90
    p_busy: float = 0.08
    p_no_answer: float = 0.08
    p_fork: float = 0.1
    p_transfer: float = 0.05
    p_early_answer: float = 0.1
    p_topup: float = 0.05
    p_ignore_hangup: float = 0.01
    max_hangup_latency_ms: int = 400
    irsf_calls: int = 0  # 0: no attack
    irsf_rules: bool = True
    irsf_threshold: int = 5
    irsf_talk_s: int = 3_600
    irsf_interval_ms: int = 500
    bundle_share: float = 0.35  # share of the accounts holding bundles (0: none)
    tenant_share: float = 0.3  # share of the accounts (without bundles) that are resellers' customers
    reseller_micros: tuple[int, int] = (40_000_000, 8_000_000)  # the prepaid money of r1 and r2
    start_ms: int = START_MS  # the simulated clock's start


@dataclass
class SimReport:
    config: dict[str, Any]
    calls_offered: int = 0
    calls_authorized: int = 0
    calls_denied: int = 0
    denials: dict[str, int] = field(default_factory=dict)
    dispositions: dict[str, int] = field(default_factory=dict)
    nibbles: int = 0
    cutoffs: int = 0
    escalations: int = 0
    unconfirmed_cutoffs: int = 0
    worst_cut_lateness_ms: int = 0
    overspend_micros: int = 0
    charged_micros: int = 0
    wall_seconds: float = 0.0
    irsf_allowed: int = 0  # attack calls authorized
    irsf_loss_micros: int = 0  # what the attack calls cost the account
    irsf_fired_after_ms: int | None = None  # from the first attack call to the suspension
    irsf_worst_cut_ms: int | None = None  # from the suspension to the end of the last call it cut
    bundle_accounts: int = 0
    bundle_grants: int = 0
    bundle_periods: int = 0  # periods opened (a grant's month, week or once)
    bundle_rollovers: int = 0  # ... that started with seconds rolled over from the period before
    bundle_calls: int = 0  # settled calls that used bundle seconds
    bundle_seconds: int = 0  # bundle seconds committed
    bundle_then_money: int = 0  # calls that used bundle seconds and then money
    tenant_customers: int = 0  # accounts under r1 or r2
    level_charges: int = 0  # settled charges of reseller levels
    level_charged_micros: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


# The tree of the tenant part: each reseller, its parent, its account, its markup on its parent's
# price (percent) as the price its own customers pay.
RESELLERS = (("r1", "default", "tenant:r1", 130), ("r2", "r1", "tenant:r2", 125))


class _Rater:
    """Longest prefix, then the bundle periods the call may draw on (as ``PlanRater`` does);
    with tenants, ``rate_chain`` as ``PlanRater`` rates the levels above a reseller's customer."""

    def __init__(self, rows: dict[str, RateRow], grants: dict[str, list[BundleGrant]],
                 zones: dict[str, str]) -> None:
        self.rows = rows  # the operator's prices
        self.grants = grants  # account -> its bundle grants
        self.zones = zones  # account -> the timezone its periods are read in
        self.tenant_of: dict[str, str] = {}  # customer account -> its reseller (absent: the operator's)
        self.prices: dict[str, dict[str, RateRow]] = {"default": rows}  # seller tenant -> its rows

    def sell_rows(self, account_id: str) -> dict[str, RateRow]:
        """The rows an account is charged at: its seller's (its reseller's, else the operator's)."""
        return self.prices[self.tenant_of.get(account_id, "default")]

    def rate(self, account_id: str, destination: str, at_ms: int) -> RatedCall:
        rows = self.sell_rows(account_id)
        for length in range(len(destination), 0, -1):
            row = rows.get(destination[:length])
            if row is not None:
                if row.blocked:
                    raise RatingRefused(DenyReason.BLOCKED, f"destination {row.prefix} is blocked")
                info = RatingInfo("sim", row.rate_id, row.prefix, row.rate_micros)
                grants = self.grants.get(account_id)
                if not grants:
                    return RatedCall(row, info)
                return RatedCall(row, info, slots_for(grants, destination, at_ms, self.zones[account_id]))
        raise RatingRefused(DenyReason.NO_RATE, f"no rate for {destination}")

    def rate_chain(self, account_id: str, destination: str, at_ms: int) -> tuple[LevelRated, ...]:
        levels: list[LevelRated] = []
        tenant = self.tenant_of.get(account_id)
        by_name = {name: (parent, account) for name, parent, account, _ in RESELLERS}
        while tenant is not None and tenant in by_name:
            parent, account = by_name[tenant]
            levels.append(LevelRated(len(levels) + 1, tenant, parent, account, self.rate(account, destination, at_ms)))
            tenant = self.tenant_of.get(account)
        return tuple(levels)


def _rate_rows(rng: random.Random) -> dict[str, RateRow]:
    rows = {}
    shapes = [(1, 1), (60, 60), (30, 6), (60, 1), (6, 6)]
    for i in range(30):
        prefix = str(rng.randint(20, 99)) + str(i)
        initial, increment = rng.choice(shapes)
        rows[prefix] = RateRow(
            prefix=prefix, destination=f"dest {i}", rate_micros=rng.choice([9_000, 25_000, 120_000, 600_000]),
            connect_fee_micros=rng.choice([0, 0, 10_000, 50_000]), initial_increment=initial, increment=increment,
            minimum_seconds=rng.choice([0, 0, 30]), grace_seconds=rng.choice([0, 0, 3]), rate_id=i + 1,
        )
    rows["900"] = RateRow(prefix="900", destination="premium", rate_micros=3_000_000, blocked=True, rate_id=99)
    return rows


def _bundle_grants(rng: random.Random, config: SimConfig, prefixes: list[str],
                   next_id: int) -> list[BundleGrant]:
    """One or two grants for one account: a few hundred seconds on a few of ``prefixes`` (the
    second overlaps the first), monthly, weekly or once; some monthly and weekly ones are large
    enough (``calls / 5`` seconds) to cover much of the account's calls to them in a long run."""
    run_ms = config.calls * config.mean_interarrival_ms
    large = max(300, config.calls // 5)
    grants: list[BundleGrant] = []
    first: tuple[str, ...] = ()
    for n in range(rng.choice([1, 1, 2])):
        covered = rng.sample(prefixes, rng.randint(2, 6))
        if first:
            covered.append(rng.choice(first))  # two grants on one number: drawn earliest expiry first
        kind = rng.choice(["month_rollover", "month", "week", "once"])
        prefixes_of = tuple(dict.fromkeys(covered))
        valid_from = config.start_ms - 40 * 86_400_000 if rng.random() < 0.7 else config.start_ms
        valid_until = 2**62
        if kind == "once":
            valid_from = config.start_ms + rng.randint(0, run_ms // 2)
            valid_until = valid_from + rng.randint(max(1, run_ms // 4), max(2, run_ms))
            bundle = BundleDef(f"once{next_id + n}", rng.choice([120, 300, 600]), prefixes_of, PeriodKind.ONCE)
        elif kind == "week":
            bundle = BundleDef(f"week{next_id + n}", rng.choice([120, 300, 600, large]), prefixes_of,
                               PeriodKind.WEEK, anchor=rng.choice([4, 4, 1]), rollover=rng.random() < 0.5)
        else:
            bundle = BundleDef(f"month{next_id + n}", rng.choice([300, 600, 1800, large]), prefixes_of,
                               PeriodKind.MONTH, anchor=1 if kind == "month_rollover" else rng.choice([1, 15, 31]),
                               rollover=kind == "month_rollover")
        grants.append(BundleGrant(next_id + n, "", check_bundle(bundle), valid_from, valid_until))
        first = bundle.prefixes
    return grants


class Simulation:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.now_ms = config.start_ms
        self.registry = CallRegistry()
        self.store = MemoryStore()
        self.rows = _rate_rows(self.rng)
        self.grants: dict[str, list[BundleGrant]] = {}
        self.zones: dict[str, str] = {}
        self.rater = _Rater(self.rows, self.grants, self.zones)
        self.settings = SessionSettings(nibble_ms=config.nibble_seconds * 1000,
                                        warning_ms=config.warning_seconds * 1000, verify_ms=config.verify_ms)
        self.pbx: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        self.records: dict[str, CallRecord] = {}
        self.duplicate_records = 0
        self.report = SimReport(config=asdict(config))
        self.opening: dict[str, int] = {}
        self.live_legs: dict[str, str] = {}  # leg id -> call id, legs the PBX has up
        self.stubborn: set[str] = set()  # calls whose first hangup command the PBX ignores
        self.pbx_limit_end: dict[str, int] = {}
        self.call_budget_at_cut: dict[str, int] = {}
        self.level_owner: dict[str, str] = {}  # a level's store call id -> the customer's call (DESIGN §11)
        for i in range(config.accounts):
            balance = self.rng.choice([0, 200_000, 2_000_000, 20_000_000, 200_000_000])
            credit = self.rng.choice([0, 0, 0, 1_000_000])
            max_calls = self.rng.choice([None, None, None, 3, 10])
            account_id = f"acct{i}"
            self.store.add_account(account_id, balance, credit, max_calls)
            self.opening[account_id] = balance
        # Bundles from a generator of their own: the traffic of a seed does not depend on them.
        bundle_rng = random.Random(config.seed * 7_919 + 1)
        prefixes = sorted(p for p, row in self.rows.items() if not row.blocked)
        self.allowance: dict[int, int] = {}  # grant id -> seconds per period
        for i in range(config.accounts):
            if bundle_rng.random() >= config.bundle_share:
                continue
            account_id = f"acct{i}"
            grants = _bundle_grants(bundle_rng, config, prefixes, len(self.allowance) + 1)
            self.grants[account_id] = grants
            self.zones[account_id] = bundle_rng.choice(BUNDLE_ZONES)
            self.allowance.update((grant.grant_id, grant.bundle.seconds) for grant in grants)
        self.report.bundle_accounts = len(self.grants)
        self.report.bundle_grants = len(self.allowance)
        # Resellers' customers from a generator of their own too (DESIGN §11; not bundle holders:
        # bundles are the operator's offer here).
        tenant_rng = random.Random(config.seed * 104_729 + 3)
        if config.tenant_share > 0:
            for (name, parent, account_id, markup), money in zip(RESELLERS, config.reseller_micros, strict=True):
                rows = self.rater.prices[parent]
                self.rater.prices[name] = {prefix: row._replace(rate_micros=row.rate_micros * markup // 100)
                                           for prefix, row in rows.items()}
                if parent != "default":
                    self.rater.tenant_of[account_id] = parent
                self.store.add_account(account_id, money)
                self.opening[account_id] = money
            for i in range(config.accounts):
                account_id = f"acct{i}"
                if account_id not in self.grants and tenant_rng.random() < config.tenant_share:
                    self.rater.tenant_of[account_id] = tenant_rng.choice([name for name, *_ in RESELLERS])
                    self.report.tenant_customers += 1
        # Per settled call: (rate row, the bundle periods it held and how much of each, in draw
        # order, the R the session held); the checks re-rate every call from these.
        self.holds_at_settle: dict[str, tuple[tuple[tuple[int, int], int], ...]] = {}
        self.session_held_s: dict[str, int] = {}
        self.fraud: RuleSet | None = None
        self.counters: LocalCounters | None = None
        self.suspended_ms: dict[str, int] = {}
        self.cut_by_rule: set[str] = set()
        if config.irsf_calls:
            self.rows[IRSF_PREFIX] = RateRow(prefix=IRSF_PREFIX, destination="premium (IRSF)", rate_micros=3_000_000,
                                             rate_id=98)
            self.store.add_account(IRSF_ACCOUNT, 1_000_000_000)
            self.opening[IRSF_ACCOUNT] = 1_000_000_000
            if config.irsf_rules:
                rule = Rule(name="irsf_parallel", kind=RuleKind.LIVE_CALLS, threshold=config.irsf_threshold,
                            action=Action.SUSPEND, line=0, group="premium")
                self.fraud = RuleSet((rule,), {"premium": frozenset({IRSF_PREFIX})})
                self.counters = LocalCounters(self.fraud)

    # ---------------------------------------------------------------- PBX script

    def at(self, at_ms: int, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.pbx, (at_ms, self.seq, action))

    def emit(self, event: LegEvent) -> None:
        self.execute(self.registry.feed(event))

    def _hangup(self, leg_id: str, cause: str = "NORMAL_CLEARING") -> None:
        if self.live_legs.pop(leg_id, None) is not None:
            self.emit(LegHungUp(leg_id, self.now_ms, cause=cause))

    def offer_call(self, index: int, attack: bool = False) -> None:
        rng = self.rng
        cfg = self.config
        self.report.calls_offered += 1
        a_leg = f"A{index}"
        if attack:
            account, destination = IRSF_ACCOUNT, f"{IRSF_PREFIX}{5550000 + index % 10000}"
        else:
            account = f"acct{rng.randrange(cfg.accounts)}"
            prefix = rng.choice([p for p in self.rows if p != IRSF_PREFIX])
            destination = prefix + "".join(rng.choice("0123456789") for _ in range(7))
        self.live_legs[a_leg] = ""
        self.emit(LegCreated(a_leg, self.now_ms, Direction.INBOUND, group_id=a_leg, caller="100"))
        if rng.random() < cfg.p_early_answer:
            self.emit(LegAnswered(a_leg, self.now_ms + 5))  # an IVR answers the caller first
        request = AuthorizeRequest("sim", a_leg, account, destination, self.now_ms, caller="100", group_id=a_leg)
        call_id = f"sim-{a_leg}"

        def store_authorize(account_id: str, want: int, minimum: int, slots: tuple[BundleSlot, ...],
                            want_s: int) -> StoreAuthorization:
            return self.store.authorize(account_id, call_id, want, minimum, self.now_ms, bundle_slots=slots,
                                        bundle_want_s=want_s)

        refused = self._screen(request, call_id)
        if refused is not None:
            outcome = Outcome(refused)
        else:
            outcome = decide(request, call_id=call_id, node="sim", rater=self.rater, store_authorize=store_authorize,
                             settings=self.settings, max_call_seconds=14_400, now_ms=self.now_ms,
                             chain_authorize=lambda account_id, want, minimum, slots, want_s, levels:
                             self.store.authorize_with_levels(account_id, call_id, want, minimum, levels, self.now_ms,
                                                              bundle_slots=slots, bundle_want_s=want_s))
            if outcome.session is None and self.counters is not None:
                self.counters.forget(account, call_id)
        if outcome.release_reservation:
            self.store.release(call_id, 1, self.now_ms)
        for level_id, _ in outcome.release_levels:
            self.level_owner[level_id] = call_id
            self.store.release(level_id, 1, self.now_ms)
        if outcome.session is not None:
            self.level_owner.update((payer.call_id, call_id) for payer in outcome.session.upper)
        if outcome.session is None:
            self.report.calls_denied += 1
            reason = str(outcome.decision.reason)
            self.report.denials[reason] = self.report.denials.get(reason, 0) + 1
            self.at(self.now_ms + 50, lambda: self._hangup(a_leg, "CALL_REJECTED"))
            return
        self.report.calls_authorized += 1
        self.execute(self.registry.add(outcome.session))
        self.live_legs[a_leg] = call_id
        if attack:
            self.report.irsf_allowed += 1
            self._script_attack(a_leg, call_id, outcome.decision.limit_ms)
            return
        if rng.random() < cfg.p_ignore_hangup:
            self.stubborn.add(call_id)
        self._script_call(a_leg, call_id, outcome.decision.limit_ms)

    def _screen(self, request: AuthorizeRequest, call_id: str) -> AuthorizeDecision | None:
        """The fraud rules, as ``agent/services/fraud.py`` applies them (synchronously here)."""
        if self.fraud is None or self.counters is None:
            return None
        account = request.account_id
        if account in self.suspended_ms:
            return AuthorizeDecision(False, call_id, reason=DenyReason.FRAUD_RULE, detail="account suspended")
        digits = destination_digits(request.destination)
        facts = CallFacts(account, call_id, digits, self.fraud.groups_of(digits), self.now_ms)
        verdict = evaluate(self.fraud, self.counters.observe(facts), facts)
        if verdict.suspend is not None:
            self.suspended_ms[account] = self.now_ms
            first = min((s.authorized_ms for s in self.registry.sessions.values() if s.account_id == account),
                        default=self.now_ms)
            self.report.irsf_fired_after_ms = self.now_ms - first
            for session in list(self.registry.sessions.values()):
                if session.account_id == account:
                    self.cut_by_rule.add(session.call_id)
                    self.execute(self.registry.schedule(session.operator_cut(self.now_ms, "fraud rule")))
        if verdict.deny is not None:
            self.counters.forget(account, call_id)
            return AuthorizeDecision(False, call_id, reason=DenyReason.FRAUD_RULE, detail=verdict.deny.describe())
        return None

    def _script_attack(self, a_leg: str, call_id: str, limit_ms: int) -> None:
        """An attack call: the premium number answers at once (300 ms) and talks until the PBX limit,
        the cut or irsf_talk_s."""
        b_leg = f"{a_leg}-B1"
        t = self.now_ms + 20
        self.at(t, lambda: self._create_b(a_leg, b_leg, call_id))
        answer_at = t + 300
        self.at(answer_at, lambda: self._answer(a_leg, b_leg))
        end = min(answer_at + self.config.irsf_talk_s * 1000, answer_at + limit_ms)
        self.at(end, lambda: self._hangup(b_leg))
        self.at(end + 5, lambda: self._hangup(a_leg))

    def _script_call(self, a_leg: str, call_id: str, limit_ms: int) -> None:
        rng = self.rng
        cfg = self.config
        t = self.now_ms + 20
        b_leg = f"{a_leg}-B1"
        self.at(t, lambda: self._create_b(a_leg, b_leg, call_id))
        roll = rng.random()
        if roll < cfg.p_busy:
            self.at(t + 400, lambda: self._hangup(b_leg, "USER_BUSY"))
            self.at(t + 450, lambda: self._hangup(a_leg, "USER_BUSY"))
            return
        if roll < cfg.p_busy + cfg.p_no_answer:
            ring = rng.randint(5_000, 30_000)
            self.at(t + ring, lambda: self._hangup(b_leg, "NO_ANSWER"))
            self.at(t + ring + 10, lambda: self._hangup(a_leg, "NO_ANSWER"))
            return
        answered_leg = b_leg
        ring = rng.randint(500, 15_000)
        if rng.random() < cfg.p_fork:  # two phones ring, the second one answers
            b2 = f"{a_leg}-B2"
            answered_leg = b2
            self.at(t + 5, lambda: self._create_b(a_leg, b2, call_id))
            self.at(t + ring, lambda: self._hangup(b_leg, "ORIGINATOR_CANCEL"))
        answer_at = t + ring
        talk_ms = max(1, int(rng.expovariate(1 / (cfg.mean_talk_s * 1000))))
        end_at = answer_at + talk_ms
        limit_end = answer_at + limit_ms  # Dial(...,L()) ends the call there, whatever the agent does
        self.pbx_limit_end[call_id] = limit_end
        self.at(answer_at, lambda: self._answer(a_leg, answered_leg))
        final_leg = answered_leg
        if rng.random() < cfg.p_transfer and talk_ms > 4_000:
            c_leg = f"{a_leg}-C"
            final_leg = c_leg
            transfer_at = answer_at + talk_ms // 2
            self.at(transfer_at, lambda: self._create_b(a_leg, c_leg, call_id))
            self.at(transfer_at + 800, lambda: self._answer(a_leg, c_leg))
            self.at(transfer_at + 900, lambda: self._hangup(answered_leg))
        end = min(end_at, limit_end)
        first, second = (a_leg, final_leg) if rng.random() < 0.5 else (final_leg, a_leg)
        self.at(end, lambda: self._hangup(first))
        self.at(end + rng.randint(1, 30), lambda: self._hangup(second))
        if rng.random() < cfg.p_topup:
            account = self.registry.sessions[call_id].account_id
            amount = rng.choice([100_000, 1_000_000])
            self.at(answer_at + rng.randint(0, talk_ms), lambda: self.store.topup(account, amount))

    def _create_b(self, a_leg: str, b_leg: str, call_id: str) -> None:
        if a_leg not in self.live_legs:
            return
        self.live_legs[b_leg] = call_id
        self.emit(LegCreated(b_leg, self.now_ms, Direction.OUTBOUND, group_id=a_leg, parent_leg_id=a_leg))
        self.emit(DialBegin(a_leg, b_leg, self.now_ms))

    def _answer(self, a_leg: str, b_leg: str) -> None:
        if a_leg not in self.live_legs or b_leg not in self.live_legs:
            return
        self.emit(LegAnswered(b_leg, self.now_ms))
        self.emit(LegBridged(a_leg, b_leg, self.now_ms))

    # ---------------------------------------------------------------- the agent's side

    def execute(self, effects: list[Effect]) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, NibbleStep):
                (result,) = self.store.nibbles([effect], self.now_ms)
                if effect.debit_micros:
                    self.report.nibbles += 1
                session = self.registry.sessions.get(effect.session_id or effect.call_id)
                if session is not None:
                    more = session.on_nibble_result(effect.seq, result.granted_micros, result.debited_micros,
                                                    self.now_ms, store_ok=result.ok, why=result.why,
                                                    bundle_granted_s=result.bundle_granted_s, level=effect.level)
                    queue += self.registry.schedule(more)
            elif isinstance(effect, SettleStep):
                self._before_settle(effect.call_id)
                self.store.settle(effect.call_id, effect.seq, effect.cost_micros, self.now_ms, effect.account_id,
                                  effect.bundle)
                queue += self._settled(effect.session_id or effect.call_id, effect.cost_micros, effect.level)
            elif isinstance(effect, ReleaseStep):
                self.store.release(effect.call_id, effect.seq, self.now_ms)
                queue += self._settled(effect.session_id or effect.call_id, 0, effect.level)
            elif isinstance(effect, Command):
                self._switch(effect)
            elif isinstance(effect, Alert):
                if effect.kind == "hangup_not_confirmed":
                    self.report.unconfirmed_cutoffs += 1
                elif effect.kind == "hangup_escalated":
                    self.report.escalations += 1
            elif isinstance(effect, Finished):
                self._record(effect.record)

    def _before_settle(self, call_id: str) -> None:
        """Note what the call holds of bundles, in the store and in its session (for the checks)."""
        call = self.store.calls.get(call_id)
        if call is not None and not call.settled:
            self.holds_at_settle[call_id] = tuple((slot.key, held) for slot, held in call.bundle_holds)
        session = self.registry.sessions.get(call_id)
        if session is not None:
            self.session_held_s[call_id] = session.bundle_seconds

    def _settled(self, call_id: str, cost: int, level: int = 0) -> list[Effect]:
        session = self.registry.sessions.get(call_id)
        return session.on_settled(self.now_ms, cost, level) if session is not None else []

    def _switch(self, effect: Command) -> None:
        command = effect.command
        if not isinstance(command, HangupLeg):
            return
        if not command.escalate and effect.call_id not in self.call_budget_at_cut:
            self.report.cutoffs += 1
            session = self.registry.sessions.get(effect.call_id)
            if session is not None and session.cut_at_ms is not None:
                self.call_budget_at_cut[effect.call_id] = session.cut_at_ms
        if effect.call_id in self.stubborn and not command.escalate:
            return  # this PBX ignores the first hangup; the escalation works
        latency = self.rng.randint(1, self.config.max_hangup_latency_ms)
        leg_id = command.leg_id
        self.at(self.now_ms + latency, lambda: self._hangup(leg_id, "NORMAL_CLEARING"))

    def _record(self, record: CallRecord) -> None:
        if record.call_id in self.records:
            self.duplicate_records += 1
        self.records[record.call_id] = record
        self.registry.remove(record.call_id)
        if self.counters is not None:
            self.counters.ended(record.account_id, record.call_id, self.now_ms, record.rating.cost_micros,
                                record.answered_ms is not None, record.duration_ms)

    # ---------------------------------------------------------------- run and check

    def run(self) -> SimReport:
        started = time.perf_counter()
        t = self.now_ms
        for index in range(self.config.calls):
            t += max(1, int(self.rng.expovariate(1 / self.config.mean_interarrival_ms)))
            self.at(t, lambda index=index: self.offer_call(index))  # type: ignore[misc]
            if self.rng.random() < self.config.p_topup:  # an operator tops an account up
                account = f"acct{self.rng.randrange(self.config.accounts)}"
                amount = self.rng.choice([1_000_000, 10_000_000])
                self.at(t, lambda account=account, amount=amount: self.store.topup(account, amount))  # type: ignore[misc]
        attack_at = START_MS + 3 * 3_600_000  # 03:00, as such attacks come
        for n in range(self.config.irsf_calls):
            index = self.config.calls + n
            self.at(attack_at + n * self.config.irsf_interval_ms,
                    lambda index=index: self.offer_call(index, attack=True))  # type: ignore[misc]
        try:
            while self.pbx or self.registry.timers:
                next_pbx = self.pbx[0][0] if self.pbx else None
                next_timer = self.registry.next_timer_ms()
                if next_timer is not None and (next_pbx is None or next_timer <= next_pbx):
                    self.now_ms = max(self.now_ms, next_timer)
                    self.execute(self.registry.fire_due(self.now_ms))
                else:
                    at_ms, _, action = heapq.heappop(self.pbx)
                    self.now_ms = max(self.now_ms, at_ms)
                    action()
        except OverspendError as exc:  # the store caught money or bundle seconds going below zero
            self.report.wall_seconds = round(time.perf_counter() - started, 3)
            self.report.violations.append(f"the store refused a step at {self.now_ms}: {exc}")
            return self.report
        self.report.wall_seconds = round(time.perf_counter() - started, 3)
        self._check()
        return self.report

    def _check(self) -> None:
        report = self.report
        v = report.violations
        report.overspend_micros = self.store.overspend_micros
        for call_id, overspend in self.store.overspend_by_call.items():
            if self.level_owner.get(call_id, call_id) not in self.stubborn:
                v.append(f"{call_id}: overspend of {overspend} micro-units although the PBX obeyed the cut")
        for account_id, account in self.store.accounts.items():
            expected = self.opening[account_id] + account.credited_micros - account.charged_micros
            if account.balance_micros != expected:
                v.append(f"{account_id}: balance {account.balance_micros} != opening + top-ups - charges {expected}")
            if account.reserved_micros != 0 or account.calls:
                v.append(f"{account_id}: {account.reserved_micros} micro-units still reserved by {account.calls}")
        if self.store.open_reservations():
            v.append(f"{self.store.open_reservations()} reservations left open")
        if self.duplicate_records:
            v.append(f"{self.duplicate_records} calls produced more than one CDR")
        if len(self.records) != report.calls_authorized:
            v.append(f"{len(self.records)} CDRs for {report.calls_authorized} authorized calls")
        cdr_total = sum(r.rating.cost_micros for r in self.records.values())
        charged = sum(cost for call_id, cost in self.store.settled.items() if not is_level_call_id(call_id))
        report.charged_micros = charged
        if cdr_total != charged:
            v.append(f"CDR costs {cdr_total} != charges {charged}")
        for call_id, record in self.records.items():
            if self.store.settled.get(call_id) != record.rating.cost_micros:
                v.append(f"{call_id}: CDR cost {record.rating.cost_micros} != charge {self.store.settled.get(call_id)}")
                break
        for call_id, cut_at in self.call_budget_at_cut.items():
            cut_record = self.records.get(call_id)
            if cut_record is None or cut_record.ended_ms is None or call_id in self.stubborn:
                continue
            lateness = cut_record.ended_ms - cut_at
            report.worst_cut_lateness_ms = max(report.worst_cut_lateness_ms, lateness)
            if lateness > 1_000:
                v.append(f"{call_id}: cut {lateness} ms after the money ran out")
        report.irsf_loss_micros = sum(r.rating.cost_micros for r in self.records.values()
                                      if r.account_id == IRSF_ACCOUNT)
        for account_id, suspended_ms in self.suspended_ms.items():
            for call_id in self.cut_by_rule:
                cut_record = self.records.get(call_id)
                if cut_record is None or cut_record.account_id != account_id or cut_record.ended_ms is None:
                    continue
                late = cut_record.ended_ms - suspended_ms
                report.irsf_worst_cut_ms = max(report.irsf_worst_cut_ms or 0, late)
                if late > 1_000:
                    v.append(f"{call_id}: cut {late} ms after the fraud rule suspended {account_id}")
        self._check_levels()
        report.dispositions = dict(Counter(r.disposition.value for r in self.records.values()))
        if report.calls_authorized and not report.dispositions.get(Disposition.CUT.value):
            v.append("no call was cut: the scenario does not exercise exhaustion")
        self._check_bundles()

    def _check_levels(self) -> None:
        """DESIGN §11: each level above a reseller's customer charged once, its own seller's price
        of the customer's duration (§4, written out in ``_section9``), as its CDR decision says."""
        report = self.report
        v = report.violations
        level_charges = {call_id: cost for call_id, cost in self.store.settled.items() if is_level_call_id(call_id)}
        seen = 0
        for call_id, record in self.records.items():
            chain = self.rater.rate_chain(record.account_id, record.destination, record.started_ms)
            if len(record.upper) != len(chain):
                v.append(f"{call_id}: {len(record.upper)} level decisions in the CDR for {len(chain)} levels")
                continue
            for level, decision in zip(chain, record.upper, strict=True):
                level_id = level_call_id(call_id, level.level)
                seen += level_id in level_charges
                row = self.rater.sell_rows(level.account_id)[record.rating.prefix]
                price = _section9(row, record.duration_ms, 0)[0] if record.answered_ms is not None else 0
                charged = level_charges.get(level_id, 0)
                if charged != price or decision.cost_micros != price or decision.account_id != level.account_id:
                    v.append(f"{call_id} level {level.level} ({level.account_id}): charged {charged}, decision "
                             f"{decision.cost_micros} on {decision.account_id or '-'}, its price for "
                             f"{record.duration_ms} ms is {price}")
                    break
        orphans = [level_id for level_id, cost in level_charges.items()
                   if self.level_owner.get(level_id) not in self.records and cost != 0]
        if orphans or seen != sum(self.level_owner.get(level_id) in self.records for level_id in level_charges):
            v.append(f"level charges that belong to no CDR: {orphans[:5]} (of {len(level_charges)})")
        report.level_charges = len(level_charges)
        report.level_charged_micros = sum(level_charges.values())

    def _check_bundles(self) -> None:
        """The §9 checks (see the module docstring), from the rate rows and the holds alone."""
        report = self.report
        v = report.violations
        expected_used: dict[tuple[int, int], int] = {}
        for call_id, record in self.records.items():
            holds = self.holds_at_settle.get(call_id, ())
            held = sum(seconds for _, seconds in holds)
            if call_id in self.session_held_s and self.session_held_s[call_id] != held:
                v.append(f"{call_id}: the session held {self.session_held_s[call_id]} bundle seconds, "
                         f"the store {held}")
            money, covered = _section9(self.rater.sell_rows(record.account_id)[record.rating.prefix],
                                       record.duration_ms, held) if record.answered_ms is not None else (0, 0)
            charged = self.store.settled.get(call_id)
            committed = self.store.bundle_used_by_call.get(call_id, 0)
            if charged != money or record.rating.cost_micros != money:
                v.append(f"{call_id}: charged {charged} (CDR {record.rating.cost_micros}) != §9 money {money} "
                         f"for {record.duration_ms} ms holding {held} bundle seconds")
            if committed != covered or record.rating.bundle_seconds != covered:
                v.append(f"{call_id}: committed {committed} bundle seconds (CDR {record.rating.bundle_seconds}) "
                         f"!= covered {covered} for {record.duration_ms} ms holding {held}")
            need = covered
            for key, seconds in holds:  # the draw order: each period gives up to what it held
                take = min(need, seconds)
                expected_used[key] = expected_used.get(key, 0) + take
                need -= take
            if covered:
                report.bundle_calls += 1
                report.bundle_seconds += covered
                report.bundle_then_money += money > 0
        report.bundle_periods = len(self.store.periods)
        for key, period in self.store.periods.items():
            allowance = self.allowance[key[0]]
            carry = period.granted_s - allowance
            report.bundle_rollovers += carry > 0
            if period.reserved_s != 0 or period.left_s < 0 or not 0 <= carry <= allowance:
                v.append(f"bundle period {key}: granted {period.granted_s} (allowance {allowance}), used "
                         f"{period.used_s}, still reserved {period.reserved_s}")
            if period.used_s != expected_used.get(key, 0):
                v.append(f"bundle period {key}: used {period.used_s} != {expected_used.get(key, 0)} "
                         "committed by its calls")
        if sum(self.store.bundle_used_by_call.values()) != report.bundle_seconds:
            v.append(f"bundle seconds committed per call {sum(self.store.bundle_used_by_call.values())} "
                     f"!= {report.bundle_seconds} covered")


def _section9(row: RateRow, duration_ms: int, held_s: int) -> tuple[int, int]:
    """(money, covered) of an answered call by DESIGN §4 and §9, written out from the row's
    fields on purpose (an independent check of agent/core/rating.py and agent/core/bundles.py)."""
    seconds = (duration_ms + 999) // 1000
    if seconds == 0 or seconds <= row.grace_seconds:
        return 0, 0
    billed = max(seconds, row.minimum_seconds)
    if billed > row.initial_increment:
        blocks = (billed - row.initial_increment + row.increment - 1) // row.increment
        billed = row.initial_increment + blocks * row.increment
    else:
        billed = row.initial_increment
    covered = min(billed, max(held_s, 0))
    fee = 0 if covered > 0 else row.connect_fee_micros
    return fee + (row.rate_micros * (billed - covered) + 59) // 60, covered


def run(config: SimConfig) -> SimReport:
    return Simulation(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deterministic billing simulation")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nibble-seconds", type=int, default=6)
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument("--irsf-calls", type=int, default=0, help="an IRSF attack of this many parallel calls")
    parser.add_argument("--no-fraud-rules", action="store_true", help="the attack with the fraud rules off")
    parser.add_argument("--bundle-share", type=float, default=SimConfig.bundle_share,
                        help="share of the accounts holding free-minute bundles (0: none)")
    args = parser.parse_args(argv)
    report = run(SimConfig(seed=args.seed, calls=args.calls, nibble_seconds=args.nibble_seconds,
                           accounts=args.accounts, irsf_calls=args.irsf_calls, irsf_rules=not args.no_fraud_rules,
                           bundle_share=args.bundle_share))
    out = asdict(report)
    out["ok"] = report.ok
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
