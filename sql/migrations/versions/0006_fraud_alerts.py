"""fraud rules: the alerts table, and which rule suspended an account and when

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", TS, nullable=False, comment="when the rule fired"),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False, comment="the rule's kind: new_calls, live_calls..."),
        sa.Column("figure", sa.BigInteger(), nullable=False,
                  comment="the figure that crossed (micro-units for spend)"),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("window_s", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False, comment="alert, deny or suspend"),
        sa.Column("call_id", sa.String(length=64), nullable=False, comment="the call the rule fired on"),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=255), nullable=False),
        sa.Column("acked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_account_id_created_at"), ["account_id", "created_at"],
                              unique=False)
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suspended_by_rule", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("suspended_at", TS, nullable=True))
        batch_op.create_index(batch_op.f("ix_accounts_suspended_by_rule"), ["suspended_by_rule"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accounts_suspended_by_rule"))
        batch_op.drop_column("suspended_at")
        batch_op.drop_column("suspended_by_rule")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_account_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_alerts_created_at"))
    op.drop_table("alerts")
