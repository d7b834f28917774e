"""wholesale: the buy side of a rating decision (DESIGN §10): the carrier that answered, its buy
rate row, the seconds and cost it bills by its own increments, and the margin

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

Recorded on the decision of the level the operator sells to (the customer's for a direct
customer, the top reseller's for a reseller's customer), in that decision's plan currency.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("carrier", sa.String(length=64), nullable=False, server_default="",
                                      comment="the carrier that answered ('' when not routed or not answered)"))
        batch_op.add_column(sa.Column("buy_rate_id", sa.BigInteger(), nullable=True, comment="the carrier's rates.id"))
        batch_op.add_column(sa.Column("buy_prefix", sa.String(length=32), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("buy_rate_micros", sa.BigInteger(), nullable=False, server_default="0",
                                      comment="per minute, in plan_currency"))
        batch_op.add_column(sa.Column("buy_billed_seconds", sa.Integer(), nullable=False, server_default="0",
                                      comment="by the carrier's increments"))
        batch_op.add_column(sa.Column("buy_cost_micros", sa.BigInteger(), nullable=True, comment="in plan_currency"))
        batch_op.add_column(sa.Column("margin_micros", sa.BigInteger(), nullable=True,
                                      comment="plan_cost_micros - buy_cost_micros"))
        batch_op.create_index(batch_op.f("ix_rating_decisions_carrier"), ["carrier"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rating_decisions_carrier"))
        for column in ("margin_micros", "buy_cost_micros", "buy_billed_seconds", "buy_rate_micros", "buy_prefix",
                       "buy_rate_id", "carrier"):
            batch_op.drop_column(column)
