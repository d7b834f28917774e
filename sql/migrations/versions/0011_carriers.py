"""wholesale: carriers (trunks with a channel limit, a priority, a weight and a state), each
carrier's buy deck as a rate plan it owns (rate_plans.carrier_id), and each sell plan's route
policy, loss permission and margin floor (DESIGN §10)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "carriers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("trunk", sa.String(length=255), nullable=False,
                  comment="Asterisk trunk (PJSIP/x) or FreeSWITCH gateway"),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("max_channels", sa.Integer(), nullable=True, comment="NULL: no limit"),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("max_channels IS NULL OR max_channels > 0", name=op.f("ck_carriers_max_channels_positive")),
        sa.CheckConstraint("priority >= 0", name=op.f("ck_carriers_priority_not_negative")),
        sa.CheckConstraint("weight >= 1", name=op.f("ck_carriers_weight_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_carriers")),
        sa.UniqueConstraint("name", name=op.f("uq_carriers_name")),
    )
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("carrier_id", sa.Integer(), nullable=True,
                                      comment="the carrier whose buy deck this is; NULL: a sell plan"))
        batch_op.add_column(sa.Column("route_policy", sa.String(length=8), nullable=False, server_default="lcr"))
        batch_op.add_column(sa.Column("allow_loss", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("margin_floor_micros", sa.BigInteger(), nullable=True,
                                      comment="margin floor, money per minute"))
        batch_op.add_column(sa.Column("margin_floor_bp", sa.Integer(), nullable=True,
                                      comment="margin floor, basis points of the sell cost"))
        batch_op.create_unique_constraint(batch_op.f("uq_rate_plans_carrier_id"), ["carrier_id"])
        batch_op.create_foreign_key(batch_op.f("fk_rate_plans_carrier_id_carriers"), "carriers", ["carrier_id"],
                                    ["id"])


def downgrade() -> None:
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_rate_plans_carrier_id_carriers"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("uq_rate_plans_carrier_id"), type_="unique")
        batch_op.drop_column("margin_floor_bp")
        batch_op.drop_column("margin_floor_micros")
        batch_op.drop_column("allow_loss")
        batch_op.drop_column("route_policy")
        batch_op.drop_column("carrier_id")
    op.drop_table("carriers")
