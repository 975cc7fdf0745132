"""quota: budgets over calendar windows, their usage, and what each reservation holds against them

Adds ``budgets`` (operator-set caps per key or user and period), ``budget_usage`` (spent and held per
calendar window, one row per window) and, on ``reservations``, the budget windows and concurrency
leases a hold took, so settling moves money in exactly the windows the hold was counted in. Existing
reservations get zeros: they hold against no budget and no lease.

Revision ID: quota_0001
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "quota_0001"
down_revision = "0001"
branch_labels = ("quota",)
depends_on = None

_NEW_RESERVATION_COLUMNS = ("budget_windows", "day_start", "month_start", "leases")


def _bigint() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("scope_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("limit_micros", _bigint(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("updated_at", _bigint(), nullable=False),
        sa.CheckConstraint("limit_micros > 0", name=op.f("ck_budgets_limit_positive")),
        sa.PrimaryKeyConstraint("scope", "scope_id", "period", name=op.f("pk_budgets")),
    )
    op.create_table(
        "budget_usage",
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("scope_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("window_start", _bigint(), nullable=False),
        sa.Column("spent_micros", _bigint(), nullable=False),
        sa.Column("reserved_micros", _bigint(), nullable=False),
        sa.Column("limit_micros", _bigint(), nullable=False),
        sa.Column("updated_at", _bigint(), nullable=False),
        sa.CheckConstraint("spent_micros >= 0", name=op.f("ck_budget_usage_spent_non_negative")),
        sa.CheckConstraint("reserved_micros >= 0", name=op.f("ck_budget_usage_reserved_non_negative")),
        sa.PrimaryKeyConstraint("scope", "scope_id", "period", "window_start", name=op.f("pk_budget_usage")),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        for name in _NEW_RESERVATION_COLUMNS:
            batch_op.add_column(sa.Column(name, _bigint(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        for name in reversed(_NEW_RESERVATION_COLUMNS):
            batch_op.drop_column(name)
    op.drop_table("budget_usage")
    op.drop_table("budgets")
