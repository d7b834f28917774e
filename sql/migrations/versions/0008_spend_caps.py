"""spend caps: max call cost, daily and monthly spend per account, their counters, the day and
month each reservation counts on, and the low-balance alert thresholds of accounts and plans

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_call_cost_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("daily_spend_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("monthly_spend_micros", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("low_balance_micros", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("low_balance_micros", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spend_day_ms", sa.BigInteger(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("spend_month_ms", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "spend_periods",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('day', 'month')", name=op.f("ck_spend_periods_kind_known")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_spend_periods_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "kind", "start_ms", name=op.f("pk_spend_periods")),
    )


def downgrade() -> None:
    op.drop_table("spend_periods")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_column("spend_month_ms")
        batch_op.drop_column("spend_day_ms")
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.drop_column("low_balance_micros")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("low_balance_micros")
        batch_op.drop_column("monthly_spend_micros")
        batch_op.drop_column("daily_spend_micros")
        batch_op.drop_column("max_call_cost_micros")
