"""request_logs.aggregated: summary rows of refusals made before the key was known.

A relay logs every request it answers, including those refused before the key was known (no key,
a bad key, auth unreachable). Under a flood it sends the first few of each second one by one and
the rest as one summary row per second whose ``aggregated`` says how many requests it stands for;
every other row has 0. On PostgreSQL the column is added to the partitioned parent, and so to every
partition.

Revision ID: logger_0002
Revises: logger_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "logger_0002"
down_revision = "logger_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "request_logs",
        sa.Column(
            "aggregated",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            server_default="0",
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        batch.drop_column("aggregated")
