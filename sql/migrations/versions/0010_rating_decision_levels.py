"""derived charging: the level of the reseller chain each rating decision charges, the tenant
whose price it is, the account charged and the customer's call it belongs to

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

A decision of a level above the customer has its own call id, the level's balance-store call
(``call^L``, agent/core/session.py ``level_call_id``), so ``(call_id, seq)`` stays unique and is
``(of_call_id, level, seq)``: readers of a call's own decisions (cdrs, rerate) are unchanged.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("level", sa.Integer(), nullable=False, server_default="0",
                                      comment="0: the customer; 1, 2, 3: the resellers above it"))
        batch_op.add_column(sa.Column("tenant", sa.String(length=64), nullable=False, server_default="",
                                      comment="whose price: the seller tenant ('' for direct customers)"))
        batch_op.add_column(sa.Column("account_id", sa.String(length=64), nullable=False, server_default="",
                                      comment="the account charged at a level above the customer ('' at level 0)"))
        batch_op.add_column(sa.Column("of_call_id", sa.String(length=64), nullable=True,
                                      comment="the customer's call (calls.id) of a level above it"))
        batch_op.create_index(batch_op.f("ix_rating_decisions_of_call_id"), ["of_call_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_rating_decisions_tenant"), ["tenant"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rating_decisions_tenant"))
        batch_op.drop_index(batch_op.f("ix_rating_decisions_of_call_id"))
        batch_op.drop_column("of_call_id")
        batch_op.drop_column("account_id")
        batch_op.drop_column("tenant")
        batch_op.drop_column("level")
