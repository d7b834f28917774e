"""cdr_quarantine: CDRs the database refused, kept with the reason

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cdr_quarantine",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.String(length=191), nullable=False),
        sa.Column("node", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False, comment="the spooled JSON of the call record"),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cdr_quarantine")),
        sa.UniqueConstraint("digest", name=op.f("uq_cdr_quarantine_digest")),
    )
    with op.batch_alter_table("cdr_quarantine", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cdr_quarantine_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("cdr_quarantine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cdr_quarantine_created_at"))
    op.drop_table("cdr_quarantine")
