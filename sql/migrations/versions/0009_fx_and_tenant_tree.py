"""currencies and tenants: effective-dated FX rates, the currency pair, rate and plan-currency
cost of each rating decision, the tenant tree (parent, currency, the reseller's own account)
and the tenant of each rate plan

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Naive UTC timestamps with microseconds, spelled out as in 0001 so that this migration never
# changes when the models module does.
TS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fx_rates",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("base", sa.String(length=3), nullable=False),
        sa.Column("quote", sa.String(length=3), nullable=False),
        sa.Column("rate_e10", sa.BigInteger(), nullable=False, comment="rate x 10^10 (exact)"),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("rate_e10 > 0", name=op.f("ck_fx_rates_rate_positive")),
        sa.CheckConstraint("base <> quote", name=op.f("ck_fx_rates_pair_of_two")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fx_rates")),
        sa.UniqueConstraint("base", "quote", "effective_from", name=op.f("uq_fx_rates_base_quote_effective_from")),
    )
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("plan_currency", sa.String(length=3), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("currency", sa.String(length=3), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("fx_rate_e10", sa.BigInteger(), nullable=True, comment="rate x 10^10; NULL: none"))
        batch_op.add_column(sa.Column("fx_inverse", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("plan_cost_micros", sa.BigInteger(), nullable=True,
                                      comment="the cost in plan_currency"))
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("currency", sa.String(length=3), nullable=False, server_default="EUR"))
        batch_op.add_column(sa.Column("account_id", sa.String(length=64), nullable=True,
                                      comment="the reseller's own account, in its parent tenant"))
        batch_op.create_index(batch_op.f("ix_tenants_parent_id"), ["parent_id"], unique=False)
        batch_op.create_unique_constraint(batch_op.f("uq_tenants_account_id"), ["account_id"])
        batch_op.create_foreign_key(batch_op.f("fk_tenants_parent_id_tenants"), "tenants", ["parent_id"], ["id"])
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_rate_plans_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_foreign_key(batch_op.f("fk_rate_plans_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("rate_plans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_rate_plans_tenant_id_tenants"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_rate_plans_tenant_id"))
        batch_op.drop_column("tenant_id")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_tenants_parent_id_tenants"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("uq_tenants_account_id"), type_="unique")
        batch_op.drop_index(batch_op.f("ix_tenants_parent_id"))
        batch_op.drop_column("account_id")
        batch_op.drop_column("currency")
        batch_op.drop_column("parent_id")
    with op.batch_alter_table("rating_decisions", schema=None) as batch_op:
        batch_op.drop_column("plan_cost_micros")
        batch_op.drop_column("fx_inverse")
        batch_op.drop_column("fx_rate_e10")
        batch_op.drop_column("currency")
        batch_op.drop_column("plan_currency")
    op.drop_table("fx_rates")
