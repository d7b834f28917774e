"""live_calls, call_commands, agent_nodes: what each daemon supervises, operator hangups, node heartbeats

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_nodes",
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("pbx", sa.String(length=64), nullable=False, comment="enabled switch adapters"),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("stopped_at", TS, nullable=True),
        sa.Column("live_calls", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("node", name=op.f("pk_agent_nodes")),
    )
    op.create_table(
        "call_commands",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("command", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("done_at", TS, nullable=True),
        sa.Column("result", sa.String(length=255), nullable=False),
        sa.CheckConstraint("command IN ('hangup')", name=op.f("ck_call_commands_command_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_call_commands")),
    )
    with op.batch_alter_table("call_commands", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_call_commands_node_done_at"), ["node", "done_at"], unique=False)

    op.create_table(
        "live_calls",
        sa.Column("call_id", sa.String(length=64), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("pbx", sa.String(length=16), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("caller", sa.String(length=128), nullable=False),
        sa.Column("a_leg_id", sa.String(length=191), nullable=False),
        sa.Column("authorized_at", TS, nullable=False),
        sa.Column("answered_at", TS, nullable=True),
        sa.Column("cut_at", TS, nullable=True, comment="when the money runs out (set once exhausted)"),
        sa.PrimaryKeyConstraint("call_id", name=op.f("pk_live_calls")),
    )
    with op.batch_alter_table("live_calls", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_live_calls_node"), ["node"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("live_calls", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_live_calls_node"))

    op.drop_table("live_calls")
    with op.batch_alter_table("call_commands", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_call_commands_node_done_at"))

    op.drop_table("call_commands")
    op.drop_table("agent_nodes")
