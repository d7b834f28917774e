"""The shared SQL schema (DESIGN §6).

Table names are a contract: many PBX nodes and other tools read the same database. Money columns
are BigInteger micro-units (``*_micros``). Timestamps are stored as naive UTC with microseconds
(see :class:`UtcDateTime`), read back as aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Micros = BigInteger


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; naive UTC with microseconds on disk."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The adapters' clock for row timestamps (the core never calls it)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """A node of the tenant tree (DESIGN §11): the operator's root (``parent_id`` NULL, level 1),
    resellers and sub-resellers below it, at most 4 levels. A reseller's own account
    (``account_id``) lives in its parent tenant and pays the parent; its customers' accounts and
    its sell plans (``rate_plans.tenant_id``) belong to it. ``account_id`` names the account
    without a foreign key: accounts refer to tenants, and a cycle of keys would make every
    creation and drop order a special case."""

    __tablename__ = "tenants"
    __table_args__ = (Index(None, "parent_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    account_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True,
                                                   comment="the reseller's own account, in its parent tenant")


class RatePlan(Base):
    __tablename__ = "rate_plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    # Plan settings for rating (DESIGN §4): local time windows and number normalisation.
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    international_prefix: Mapped[str] = mapped_column(String(8), default="00")
    # Bumped by every import; daemons poll it to reload their in-memory rate table.
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The low-balance alert threshold of its accounts that set none (NULL: no alert).
    low_balance_micros: Mapped[int | None] = mapped_column(Micros, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The tenant that sells on this plan (DESIGN §11); NULL: the operator's (the root tenant's).
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True, index=True)
    # Wholesale (DESIGN §10). A plan with a carrier is that carrier's buy deck (``carrier:NAME``),
    # hidden from the sell-plan listings; one per carrier.
    carrier_id: Mapped[int | None] = mapped_column(ForeignKey("carriers.id"), nullable=True, unique=True,
                                                   comment="the carrier whose buy deck this is; NULL: a sell plan")
    # How the carriers of a sell plan's calls are ordered: lcr, priority or weight (agent/core/routing.py).
    route_policy: Mapped[str] = mapped_column(String(8), default="lcr")
    # Revenue assurance: route to a carrier that costs more than the sell price (default: never).
    allow_loss: Mapped[bool] = mapped_column(Boolean, default=False)
    # Margin floor: money per minute (micro-units) or basis points of the sell cost; at most one set.
    margin_floor_micros: Mapped[int | None] = mapped_column(Micros, nullable=True,
                                                            comment="margin floor, money per minute")
    margin_floor_bp: Mapped[int | None] = mapped_column(Integer, nullable=True,
                                                        comment="margin floor, basis points of the sell cost")


class Carrier(Base):
    """A carrier (trunk) that terminates calls (DESIGN §10). Its buy deck is the rate plan whose
    ``carrier_id`` is this carrier (``carrier:NAME``), imported with ``rates import --carrier``.
    ``priority``: lower is tried first (policy ``priority``, ties of ``lcr``, groups of
    ``weight``); ``weight``: the share of first attempts within a priority (policy ``weight``)."""

    __tablename__ = "carriers"
    __table_args__ = (
        CheckConstraint("max_channels IS NULL OR max_channels > 0", name="max_channels_positive"),
        CheckConstraint("priority >= 0", name="priority_not_negative"),
        CheckConstraint("weight >= 1", name="weight_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    trunk: Mapped[str] = mapped_column(String(255), comment="Asterisk trunk (PJSIP/x) or FreeSWITCH gateway")
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    max_channels: Mapped[int | None] = mapped_column(Integer, nullable=True, comment="NULL: no limit")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class FxRateRow(Base):
    """Effective-dated FX rates (DESIGN §11): one unit of ``base`` is worth ``rate_e10 / 10^10``
    units of ``quote`` from ``effective_from`` (UTC) on, until the pair's next row. Exact:
    an integer, never a float. Rows are added, not changed (``fx set`` of an existing instant is
    refused), so a call's rate can always be found again."""

    __tablename__ = "fx_rates"
    __table_args__ = (
        UniqueConstraint("base", "quote", "effective_from"),
        CheckConstraint("rate_e10 > 0", name="rate_positive"),
        CheckConstraint("base <> quote", name="pair_of_two"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    base: Mapped[str] = mapped_column(String(3))
    quote: Mapped[str] = mapped_column(String(3))
    rate_e10: Mapped[int] = mapped_column(BigInteger, comment="rate x 10^10 (exact)")
    effective_from: Mapped[datetime] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Rate(Base):
    __tablename__ = "rates"
    __table_args__ = (
        UniqueConstraint(
            "plan_id", "prefix", "effective_from", "weekdays", "time_from_minute",
            name="uq_rates_plan_prefix_window",
        ),
        Index(None, "plan_id", "prefix"),
        CheckConstraint("rate_micros >= 0", name="rate_not_negative"),
        CheckConstraint("connect_fee_micros >= 0", name="connect_fee_not_negative"),
        CheckConstraint("initial_increment > 0 AND increment > 0", name="increments_positive"),
        CheckConstraint("minimum_seconds >= 0 AND grace_seconds >= 0", name="min_grace_not_negative"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("rate_plans.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(32))
    destination: Mapped[str] = mapped_column(String(128), default="")
    rate_micros: Mapped[int] = mapped_column(Micros, comment="money per minute, micro-units")
    connect_fee_micros: Mapped[int] = mapped_column(Micros, default=0)
    initial_increment: Mapped[int] = mapped_column(Integer, default=1, comment="seconds")
    increment: Mapped[int] = mapped_column(Integer, default=1, comment="seconds")
    minimum_seconds: Mapped[int] = mapped_column(Integer, default=0)
    grace_seconds: Mapped[int] = mapped_column(Integer, default=0)
    # Half-open [effective_from, effective_to) in UTC; effective_from defaults to the epoch so
    # that the unique key above is enforced (NULLs are distinct in a unique index).
    effective_from: Mapped[datetime] = mapped_column(UtcDateTime)
    effective_to: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Optional time-of-day window in the plan's timezone: ISO weekdays ("12345" = Mon-Fri, ""
    # = every day) and [time_from_minute, time_to_minute) minutes of the day (may wrap midnight).
    weekdays: Mapped[str] = mapped_column(String(7), default="")
    time_from_minute: Mapped[int] = mapped_column(Integer, default=0)
    time_to_minute: Mapped[int] = mapped_column(Integer, default=1440)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("credit_limit_micros >= 0", name="credit_limit_not_negative"),
        CheckConstraint("reserved_micros >= 0", name="reserved_not_negative"),
        CheckConstraint("status IN ('active', 'suspended', 'closed')", name="status_known"),
        CheckConstraint("account_type IN ('prepaid', 'postpaid')", name="type_known"),
        Index(None, "suspended_by_rule"),  # every node looks for accounts a fraud rule suspended
    )

    # The PBX's account code (Asterisk CHANNEL(accountcode), FreeSWITCH accountcode variable).
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    rate_plan_id: Mapped[int] = mapped_column(ForeignKey("rate_plans.id"))
    currency: Mapped[str] = mapped_column(String(3))
    account_type: Mapped[str] = mapped_column(String(8), default="prepaid")
    status: Mapped[str] = mapped_column(String(16), default="active")
    credit_limit_micros: Mapped[int] = mapped_column(Micros, default=0)
    # balance_micros is the sum of this account's ledger entries, maintained in the same
    # transaction as every insert into ledger_entries (`billing-agent ledger check` proves it).
    balance_micros: Mapped[int] = mapped_column(Micros, default=0)
    # Money held by open reservations of the embedded SQL balance store (0 when Redis is used).
    reserved_micros: Mapped[int] = mapped_column(Micros, default=0)
    max_concurrent_calls: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # Set when a fraud rule suspended the account (fraud/rules.yaml); cleared by `accounts resume`.
    suspended_by_rule: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suspended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Spending caps beside the balance (DESIGN §8); NULL: no cap. Days and months are read in the
    # timezone of the account's rate plan.
    max_call_cost_micros: Mapped[int | None] = mapped_column(Micros, nullable=True)
    daily_spend_micros: Mapped[int | None] = mapped_column(Micros, nullable=True)
    monthly_spend_micros: Mapped[int | None] = mapped_column(Micros, nullable=True)
    # An alert when the available money falls below this (DESIGN §8); NULL: the plan's threshold.
    low_balance_micros: Mapped[int | None] = mapped_column(Micros, nullable=True)


class LedgerEntry(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index(None, "account_id", "id"),
        CheckConstraint(
            "kind IN ('opening', 'topup', 'charge', 'refund', 'adjustment')", name="kind_known"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(16))
    # Signed: credits (top-ups, refunds) are positive, charges negative.
    amount_micros: Mapped[int] = mapped_column(Micros)
    balance_after_micros: Mapped[int] = mapped_column(Micros)
    # Idempotency key of the movement, unique across the whole ledger.
    reference: Mapped[str] = mapped_column(String(191), unique=True)
    call_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Call(Base):
    """One billing session: the raw facts of a call, never its price (see RatingDecision).

    ``call_legs`` and ``rating_decisions`` refer to ``calls.id`` without a foreign key (migration
    0005): the three tables are append-only, written only by the CDR writer, a call with its legs
    and decision in one transaction; the checks were over half of PostgreSQL's work per CDR.
    """

    __tablename__ = "calls"
    __table_args__ = (
        Index(None, "account_id", "started_at"),
        Index(None, "started_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(64))
    caller: Mapped[str] = mapped_column(String(64), default="")
    destination: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    duration_ms: Mapped[int] = mapped_column(BigInteger, default=0, comment="billed leg answer to hangup")
    # ANSWERED, NO ANSWER, BUSY, FAILED, DENIED, CUT (money ran out)
    disposition: Mapped[str] = mapped_column(String(16))
    hangup_cause: Mapped[str] = mapped_column(String(64), default="")
    pbx: Mapped[str] = mapped_column(String(16), default="")
    settled_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class CallLeg(Base):
    __tablename__ = "call_legs"
    __table_args__ = (UniqueConstraint("call_id", "pbx_unique_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(64))  # calls.id; no foreign key: see Call
    pbx_unique_id: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(255), default="")
    direction: Mapped[str] = mapped_column(String(8), comment="inbound (caller, A) or outbound (B)")
    sip_call_id: Mapped[str] = mapped_column(String(255), default="")
    peer: Mapped[str] = mapped_column(String(128), default="")
    caller: Mapped[str] = mapped_column(String(64), default="")
    callee: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    hangup_cause: Mapped[str] = mapped_column(String(64), default="")
    billsec: Mapped[int] = mapped_column(Integer, default=0)
    billed: Mapped[bool] = mapped_column(Boolean, default=False, comment="the leg billing ran from")


class RatingDecision(Base):
    """Append-only: the original rating is seq 1; every re-rating adds seq + 1."""

    __tablename__ = "rating_decisions"
    __table_args__ = (UniqueConstraint("call_id", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(64))  # calls.id; no foreign key: see Call
    seq: Mapped[int] = mapped_column(Integer)
    plan_name: Mapped[str] = mapped_column(String(64), default="")
    rate_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    prefix: Mapped[str] = mapped_column(String(32), default="")
    rate_micros: Mapped[int] = mapped_column(Micros, default=0)
    billed_seconds: Mapped[int] = mapped_column(Integer, default=0)
    bundle_seconds: Mapped[int] = mapped_column(Integer, default=0,
                                                comment="of billed_seconds, covered by bundles (bundle_usage has each)")
    cost_micros: Mapped[int] = mapped_column(Micros, default=0)  # in ``currency``, the account's
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)
    reason: Mapped[str] = mapped_column(String(255), default="")
    # Currencies (DESIGN §11): the plan's and the account's ('' on decisions older than 0009:
    # both were the account's). A conversion records the fx_rates row's rate; fx_inverse says
    # the row was the pair currency/plan_currency, used as its exact reciprocal.
    plan_currency: Mapped[str] = mapped_column(String(3), default="")
    currency: Mapped[str] = mapped_column(String(3), default="")
    fx_rate_e10: Mapped[int | None] = mapped_column(BigInteger, nullable=True, comment="rate x 10^10; NULL: none")
    fx_inverse: Mapped[bool] = mapped_column(Boolean, default=False)
    plan_cost_micros: Mapped[int | None] = mapped_column(Micros, nullable=True, comment="the cost in plan_currency")
    # Derived charging (DESIGN §11, migration 0010): a level above the customer has its own row
    # under its balance-store call id (``call^L``), so (call_id, seq) is (of_call_id, level, seq).
    level: Mapped[int] = mapped_column(Integer, default=0,
                                       comment="0: the customer; 1, 2, 3: the resellers above it")
    tenant: Mapped[str] = mapped_column(String(64), default="", index=True,
                                        comment="whose price: the seller tenant ('' for direct customers)")
    account_id: Mapped[str] = mapped_column(String(64), default="",
                                            comment="the account charged at a level above the customer ('' at level 0)")
    of_call_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True,
                                                   comment="the customer's call (calls.id) of a level above it")
    # Wholesale (DESIGN §10, migration 0012), on the decision of the level the operator sells to:
    # the carrier that answered, its buy row, what it bills by its own increments (in
    # plan_currency) and the margin (plan_cost_micros - buy_cost_micros). NULL / '': not routed.
    carrier: Mapped[str] = mapped_column(String(64), default="", index=True,
                                         comment="the carrier that answered ('' when not routed or not answered)")
    buy_rate_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, comment="the carrier's rates.id")
    buy_prefix: Mapped[str] = mapped_column(String(32), default="")
    buy_rate_micros: Mapped[int] = mapped_column(Micros, default=0, comment="per minute, in plan_currency")
    buy_billed_seconds: Mapped[int] = mapped_column(Integer, default=0, comment="by the carrier's increments")
    buy_cost_micros: Mapped[int | None] = mapped_column(Micros, nullable=True, comment="in plan_currency")
    margin_micros: Mapped[int | None] = mapped_column(Micros, nullable=True,
                                                      comment="plan_cost_micros - buy_cost_micros")


class CdrQuarantine(Base):
    """CDRs the database refused or the agent could not decode, kept with the reason.

    Filled by the CDR writer (agent/adapters/sql/cdr_writer.py); ``digest`` (sha256 of the
    spooled JSON) makes a replay quarantine a record once. Operators fix and re-inject by hand.
    """

    __tablename__ = "cdr_quarantine"
    __table_args__ = (Index(None, "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    call_id: Mapped[str] = mapped_column(String(191), default="")
    node: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(String(1000))
    payload: Mapped[str] = mapped_column(Text, comment="the spooled JSON of the call record")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Reservation(Base):
    """Money held for one call by the embedded SQL balance store (agent/adapters/sql/balance_store.py).

    Open rows hold ``reserved_micros`` (the next slice) plus ``debited_micros`` (slices already
    used, charged at settle as one ledger entry ``charge:{call_id}``); ``accounts.reserved_micros``
    equals the sum of both over the account's open rows (`billing-agent ledger check` proves it).
    Closed rows (settled, released, expired) stay as the record of the call's idempotency keys.
    """

    __tablename__ = "reservations"
    __table_args__ = (
        Index(None, "account_id", "state"),
        Index(None, "state", "expires_at"),
        CheckConstraint("state IN ('open', 'settled', 'released', 'expired')", name="state_known"),
        CheckConstraint("reserved_micros >= 0 AND debited_micros >= 0 AND overrun_micros >= 0",
                        name="amounts_not_negative"),
    )

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    node: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default="open")
    seq: Mapped[int] = mapped_column(Integer, default=0, comment="last applied step (authorize = 0)")
    granted_micros: Mapped[int] = mapped_column(Micros, default=0, comment="last step's grant (replays)")
    last_debit_micros: Mapped[int] = mapped_column(Micros, default=0, comment="last step's debit (replays)")
    auth_granted_micros: Mapped[int] = mapped_column(Micros, default=0)
    auth_available_micros: Mapped[int] = mapped_column(Micros, default=0)
    reserved_micros: Mapped[int] = mapped_column(Micros, default=0)
    debited_micros: Mapped[int] = mapped_column(Micros, default=0)
    overrun_micros: Mapped[int] = mapped_column(Micros, default=0)
    closed_charge_micros: Mapped[int | None] = mapped_column(
        Micros, nullable=True, comment="debits charged when the reservation expired or was released")
    cost_micros: Mapped[int | None] = mapped_column(Micros, nullable=True, comment="settled cost")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Bundle seconds (DESIGN §9): held for the call (used + the next slice), used so far by its
    # nibbles, granted by the last step (replays), and the periods drawn on, as JSON
    # ``[[grant_id, period_start_ms, held_s, allowance_s, carry_from_ms|null], ...]`` in draw order.
    bundle_held_s: Mapped[int] = mapped_column(BigInteger, default=0)
    bundle_used_s: Mapped[int] = mapped_column(BigInteger, default=0)
    bundle_last_granted_s: Mapped[int] = mapped_column(BigInteger, default=0)
    bundle_slots: Mapped[str] = mapped_column(Text, default="")
    # The calendar day and month (local midnight, epoch ms) the call counts on for the spend caps.
    spend_day_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    spend_month_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class AgentNode(Base):
    """One row per running agent (``node.id``): operators see which nodes are alive.

    The daemon refreshes ``heartbeat_at`` every ``daemon.publish_seconds``; ``stopped_at`` is set
    on a clean shutdown. A node whose heartbeat is old has crashed or lost the database.
    """

    __tablename__ = "agent_nodes"

    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[str] = mapped_column(String(32), default="")
    pbx: Mapped[str] = mapped_column(String(64), default="", comment="enabled switch adapters")
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    live_calls: Mapped[int] = mapped_column(Integer, default=0)


class LiveCallRow(Base):
    """The calls a node supervises right now (facts only: the money is in the balance store).

    Published off the call path by each daemon (new calls inserted, answers updated once, ended
    calls deleted) so that ``billing-agent calls list`` sees every node's calls.
    """

    __tablename__ = "live_calls"
    __table_args__ = (Index(None, "node"),)

    call_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    pbx: Mapped[str] = mapped_column(String(16), default="")
    account_id: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64), default="")
    caller: Mapped[str] = mapped_column(String(128), default="")
    a_leg_id: Mapped[str] = mapped_column(String(191), default="")
    authorized_at: Mapped[datetime] = mapped_column(UtcDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cut_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True,
                                                    comment="when the money runs out (set once exhausted)")


class CallCommand(Base):
    """An operator's request for a live call (``billing-agent calls hangup``), carried out by the
    node that supervises the call; it marks the row done with the result."""

    __tablename__ = "call_commands"
    __table_args__ = (
        Index(None, "node", "done_at"),
        CheckConstraint("command IN ('hangup')", name="command_known"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    call_id: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(String(16), default="hangup")
    reason: Mapped[str] = mapped_column(String(255), default="")
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    result: Mapped[str] = mapped_column(String(255), default="")


class FraudAlert(Base):
    """One fraud rule that fired (DESIGN §8). Append-only: rows are inserted by the daemon and
    never deleted; ``alerts ack`` only stamps ``acked_at`` once. ``account_id`` names the account
    without a foreign key, so an alert outlives an account that was deleted."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(None, "created_at"),
        Index(None, "account_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, comment="when the rule fired")
    node: Mapped[str] = mapped_column(String(64))
    account_id: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32), comment="the rule's kind: new_calls, live_calls...")
    figure: Mapped[int] = mapped_column(BigInteger, comment="the figure that crossed (micro-units for spend)")
    threshold: Mapped[int] = mapped_column(BigInteger)
    window_s: Mapped[int] = mapped_column(Integer, default=0)
    action: Mapped[str] = mapped_column(String(16), comment="alert, deny or suspend")
    call_id: Mapped[str] = mapped_column(String(64), default="", comment="the call the rule fired on")
    destination: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(String(255), default="")
    acked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Bundle(Base):
    """A free-minute bundle as sold (DESIGN §9): ``seconds`` per period to the numbers starting
    with one of its prefixes (``bundle_prefixes``). ``deleted_at`` retires it: existing grants
    keep their history, no new grant or call draws on it."""

    __tablename__ = "bundles"
    __table_args__ = (
        CheckConstraint("period IN ('month', 'week', 'once')", name="period_known"),
        CheckConstraint("seconds > 0", name="seconds_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    seconds: Mapped[int] = mapped_column(BigInteger, comment="allowance per period, seconds")
    period: Mapped[str] = mapped_column(String(8), default="month")
    anchor: Mapped[int] = mapped_column(Integer, default=1,
                                        comment="month: day 1-31 (31 = the last day); week: ISO weekday 1-7")
    rollover: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class BundlePrefix(Base):
    """One destination prefix a bundle covers."""

    __tablename__ = "bundle_prefixes"

    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id", ondelete="CASCADE"), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), primary_key=True)


class BundleGrant(Base):
    """A bundle granted to an account over ``[valid_from, valid_until)``; ``reference`` makes
    ``bundles grant`` idempotent, as for top-ups."""

    __tablename__ = "bundle_grants"
    __table_args__ = (Index(None, "account_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    valid_from: Mapped[datetime] = mapped_column(UtcDateTime)
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    reference: Mapped[str] = mapped_column(String(191), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class BundlePeriod(Base):
    """The counters of one grant's period (``left = granted - used - reserved``), opened when a
    call first draws on it. ``granted_s`` and ``used_s`` are sums of ``bundle_usage`` rows
    (`ledger check` proves it); ``reserved_s`` is what live calls hold (embedded SQL store; with
    Redis the live holds are in Redis)."""

    __tablename__ = "bundle_periods"
    __table_args__ = (
        CheckConstraint("granted_s >= 0 AND reserved_s >= 0", name="seconds_not_negative"),
    )

    grant_id: Mapped[int] = mapped_column(ForeignKey("bundle_grants.id"), primary_key=True)
    period_start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[str] = mapped_column(String(64), index=True)
    period_end_ms: Mapped[int] = mapped_column(BigInteger)
    granted_s: Mapped[int] = mapped_column(BigInteger, default=0, comment="allowance + rollover")
    used_s: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved_s: Mapped[int] = mapped_column(BigInteger, default=0)


class BundleUsage(Base):
    """The append-only ledger of bundle seconds: ``grant`` (+allowance) and ``rollover`` (+carry)
    when a period opens, ``use`` (-seconds a call took), ``adjust`` (re-rating). Each row has a
    unique reference; a period's left = the sum of its rows."""

    __tablename__ = "bundle_usage"
    __table_args__ = (
        Index(None, "grant_id", "period_start_ms"),
        Index(None, "call_id"),
        CheckConstraint("kind IN ('grant', 'rollover', 'use', 'adjust')", name="kind_known"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(String(64))
    grant_id: Mapped[int] = mapped_column(BigInteger)
    period_start_ms: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    seconds: Mapped[int] = mapped_column(BigInteger, comment="signed: + granted, - used")
    reference: Mapped[str] = mapped_column(String(191), unique=True)
    call_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class SpendPeriod(Base):
    """What an account spent and holds on one calendar day or month, for its spend caps (DESIGN
    §8): ``spent_micros`` is the sum of the charges of the calls that started in it (settled or
    closed), ``held_micros`` what its open calls hold (reservation + nibble debits). Written in
    the same transaction as the balance by the embedded store; `ledger check` proves it."""

    __tablename__ = "spend_periods"
    __table_args__ = (CheckConstraint("kind IN ('day', 'month')", name="kind_known"),)

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    spent_micros: Mapped[int] = mapped_column(Micros, default=0)
    held_micros: Mapped[int] = mapped_column(Micros, default=0)
