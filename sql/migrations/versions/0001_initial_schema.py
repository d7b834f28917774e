"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds (see agent.adapters.sql.models.UtcDateTime). Spelled out
# here so that this migration never changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("answered_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False, comment="billed leg answer to hangup"),
        sa.Column("disposition", sa.String(length=16), nullable=False),
        sa.Column("hangup_cause", sa.String(length=64), nullable=False),
        sa.Column("pbx", sa.String(length=16), nullable=False),
        sa.Column("settled_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calls")),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_calls_account_id_started_at"), ["account_id", "started_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_calls_started_at"), ["started_at"], unique=False)

    op.create_table(
        "rate_plans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("international_prefix", sa.String(length=8), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_rate_plans_name")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("rate_plan_id", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("account_type", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credit_limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.Column("max_concurrent_calls", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("account_type IN ('prepaid', 'postpaid')", name=op.f("ck_accounts_type_known")),
        sa.CheckConstraint(
            "status IN ('active', 'suspended', 'closed')", name=op.f("ck_accounts_status_known")
        ),
        sa.CheckConstraint("credit_limit_micros >= 0", name=op.f("ck_accounts_credit_limit_not_negative")),
        sa.CheckConstraint("reserved_micros >= 0", name=op.f("ck_accounts_reserved_not_negative")),
        sa.ForeignKeyConstraint(
            ["rate_plan_id"], ["rate_plans.id"], name=op.f("fk_accounts_rate_plan_id_rate_plans")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_accounts_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
    )
    op.create_table(
        "call_legs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("pbx_unique_id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=255), nullable=False),
        sa.Column(
            "direction", sa.String(length=8), nullable=False, comment="inbound (caller, A) or outbound (B)"
        ),
        sa.Column("sip_call_id", sa.String(length=255), nullable=False),
        sa.Column("peer", sa.String(length=128), nullable=False),
        sa.Column("caller", sa.String(length=64), nullable=False),
        sa.Column("callee", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("answered_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("hangup_cause", sa.String(length=64), nullable=False),
        sa.Column("billsec", sa.Integer(), nullable=False),
        sa.Column("billed", sa.Boolean(), nullable=False, comment="the leg billing ran from"),
        sa.ForeignKeyConstraint(
            ["call_id"], ["calls.id"], name=op.f("fk_call_legs_call_id_calls"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_legs")),
        sa.UniqueConstraint("call_id", "pbx_unique_id", name=op.f("uq_call_legs_call_id_pbx_unique_id")),
    )
    op.create_table(
        "rates",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("rate_micros", sa.BigInteger(), nullable=False, comment="money per minute, micro-units"),
        sa.Column("connect_fee_micros", sa.BigInteger(), nullable=False),
        sa.Column("initial_increment", sa.Integer(), nullable=False, comment="seconds"),
        sa.Column("increment", sa.Integer(), nullable=False, comment="seconds"),
        sa.Column("minimum_seconds", sa.Integer(), nullable=False),
        sa.Column("grace_seconds", sa.Integer(), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("effective_to", TS, nullable=True),
        sa.Column("weekdays", sa.String(length=7), nullable=False),
        sa.Column("time_from_minute", sa.Integer(), nullable=False),
        sa.Column("time_to_minute", sa.Integer(), nullable=False),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.CheckConstraint("connect_fee_micros >= 0", name=op.f("ck_rates_connect_fee_not_negative")),
        sa.CheckConstraint(
            "initial_increment > 0 AND increment > 0", name=op.f("ck_rates_increments_positive")
        ),
        sa.CheckConstraint(
            "minimum_seconds >= 0 AND grace_seconds >= 0", name=op.f("ck_rates_min_grace_not_negative")
        ),
        sa.CheckConstraint("rate_micros >= 0", name=op.f("ck_rates_rate_not_negative")),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["rate_plans.id"], name=op.f("fk_rates_plan_id_rate_plans"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rates")),
        sa.UniqueConstraint(
            "plan_id",
            "prefix",
            "effective_from",
            "weekdays",
            "time_from_minute",
            name="uq_rates_plan_prefix_window",
        ),
    )
    with op.batch_alter_table("rates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rates_plan_id_prefix"), ["plan_id", "prefix"], unique=False)

    op.create_table(
        "rating_decisions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("plan_name", sa.String(length=64), nullable=False),
        sa.Column("rate_id", sa.BigInteger(), nullable=True),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("rate_micros", sa.BigInteger(), nullable=False),
        sa.Column("billed_seconds", sa.Integer(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_id"], ["calls.id"], name=op.f("fk_rating_decisions_call_id_calls"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rating_decisions")),
        sa.UniqueConstraint("call_id", "seq", name=op.f("uq_rating_decisions_call_id_seq")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("balance_after_micros", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(length=191), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=True),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint(
            "kind IN ('opening', 'topup', 'charge', 'refund', 'adjustment')",
            name=op.f("ck_ledger_entries_kind_known"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_ledger_entries_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("reference", name=op.f("uq_ledger_entries_reference")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_account_id_id"), ["account_id", "id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ledger_entries_call_id"), ["call_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_call_id"))
        batch_op.drop_index(batch_op.f("ix_ledger_entries_account_id_id"))

    op.drop_table("ledger_entries")
    op.drop_table("rating_decisions")
    with op.batch_alter_table("rates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rates_plan_id_prefix"))

    op.drop_table("rates")
    op.drop_table("call_legs")
    op.drop_table("accounts")
    op.drop_table("tenants")
    op.drop_table("rate_plans")
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calls_started_at"))
        batch_op.drop_index(batch_op.f("ix_calls_account_id_started_at"))

    op.drop_table("calls")
