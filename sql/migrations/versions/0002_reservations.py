"""reservations of the embedded SQL balance store

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False, comment="last applied step (authorize = 0)"),
        sa.Column("granted_micros", sa.BigInteger(), nullable=False, comment="last step's grant (replays)"),
        sa.Column("last_debit_micros", sa.BigInteger(), nullable=False, comment="last step's debit (replays)"),
        sa.Column("auth_granted_micros", sa.BigInteger(), nullable=False),
        sa.Column("auth_available_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.Column("debited_micros", sa.BigInteger(), nullable=False),
        sa.Column("overrun_micros", sa.BigInteger(), nullable=False),
        sa.Column("closed_charge_micros", sa.BigInteger(), nullable=True,
                  comment="debits charged when the reservation expired or was released"),
        sa.Column("cost_micros", sa.BigInteger(), nullable=True, comment="settled cost"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("closed_at", TS, nullable=True),
        sa.CheckConstraint(
            "state IN ('open', 'settled', 'released', 'expired')", name=op.f("ck_reservations_state_known")
        ),
        sa.CheckConstraint(
            "reserved_micros >= 0 AND debited_micros >= 0 AND overrun_micros >= 0",
            name=op.f("ck_reservations_amounts_not_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_reservations_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_reservations")),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reservations_account_id_state"), ["account_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_reservations_state_expires_at"), ["state", "expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_state_expires_at"))
        batch_op.drop_index(batch_op.f("ix_reservations_account_id_state"))
    op.drop_table("reservations")
