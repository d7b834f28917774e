"""free-minute bundles: definitions, prefixes, grants, period counters, the usage ledger, and
the bundle seconds of reservations and rating decisions

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("seconds", sa.BigInteger(), nullable=False, comment="allowance per period, seconds"),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("anchor", sa.Integer(), nullable=False,
                  comment="month: day 1-31 (31 = the last day); week: ISO weekday 1-7"),
        sa.Column("rollover", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("deleted_at", TS, nullable=True),
        sa.CheckConstraint("period IN ('month', 'week', 'once')", name=op.f("ck_bundles_period_known")),
        sa.CheckConstraint("seconds > 0", name=op.f("ck_bundles_seconds_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundles")),
        sa.UniqueConstraint("name", name=op.f("uq_bundles_name")),
    )
    op.create_table(
        "bundle_prefixes",
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundles.id"], name=op.f("fk_bundle_prefixes_bundle_id_bundles"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("bundle_id", "prefix", name=op.f("pk_bundle_prefixes")),
    )
    op.create_table(
        "bundle_grants",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("valid_from", TS, nullable=False),
        sa.Column("valid_until", TS, nullable=True),
        sa.Column("reference", sa.String(length=191), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_bundle_grants_account_id_accounts")),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundles.id"], name=op.f("fk_bundle_grants_bundle_id_bundles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_grants")),
        sa.UniqueConstraint("reference", name=op.f("uq_bundle_grants_reference")),
    )
    with op.batch_alter_table("bundle_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundle_grants_account_id"), ["account_id"], unique=False)
    op.create_table(
        "bundle_periods",
        sa.Column("grant_id", BIG_ID, nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("period_end_ms", sa.BigInteger(), nullable=False),
        sa.Column("granted_s", sa.BigInteger(), nullable=False, comment="allowance + rollover"),
        sa.Column("used_s", sa.BigInteger(), nullable=False),
        sa.Column("reserved_s", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("granted_s >= 0 AND reserved_s >= 0", name=op.f("ck_bundle_periods_seconds_not_negative")),
        sa.ForeignKeyConstraint(["grant_id"], ["bundle_grants.id"], name=op.f("fk_bundle_periods_grant_id_bundle_grants")),
        sa.PrimaryKeyConstraint("grant_id", "period_start_ms", name=op.f("pk_bundle_periods")),
    )
    with op.batch_alter_table("bundle_periods", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundle_periods_account_id"), ["account_id"], unique=False)
    op.create_table(
        "bundle_usage",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("grant_id", sa.BigInteger(), nullable=False),
        sa.Column("period_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("seconds", sa.BigInteger(), nullable=False, comment="signed: + granted, - used"),
        sa.Column("reference", sa.String(length=191), nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("kind IN ('grant', 'rollover', 'use', 'adjust')", name=op.f("ck_bundle_usage_kind_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_usage")),
        sa.UniqueConstraint("reference", name=op.f("uq_bundle_usage_reference")),
    )
    with op.batch_alter_table("bundle_usage", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundle_usage_grant_id_period_start_ms"), ["grant_id", "period_start_ms"],
                              unique=False)
        batch_op.create_index(batch_op.f("ix_bundle_usage_call_id"), ["call_id"], unique=False)
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bundle_held_s", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("bundle_used_s", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("bundle_last_granted_s", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("bundle_slots", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bundle_seconds", sa.Integer(), nullable=False, server_default="0",
                                      comment="of billed_seconds, covered by bundles (bundle_usage has each)"))


def downgrade() -> None:
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.drop_column("bundle_seconds")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_column("bundle_slots")
        batch_op.drop_column("bundle_last_granted_s")
        batch_op.drop_column("bundle_used_s")
        batch_op.drop_column("bundle_held_s")
    op.drop_table("bundle_usage")
    op.drop_table("bundle_periods")
    op.drop_table("bundle_grants")
    op.drop_table("bundle_prefixes")
    op.drop_table("bundles")
