"""request_logs.lease_id: the credit lease a request was admitted on.

Usage events name the lease that admitted the request (``UsageEvent.lease_id``; then
``reservation_id`` is empty), and the logger stores every event field under its own name. Rows of
requests that held an exact reservation, and every row written before, have ''. On PostgreSQL the
column is added to the partitioned parent, and so to every partition.

Revision ID: logger_0003
Revises: logger_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "logger_0003"
down_revision = "logger_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "request_logs",
        sa.Column("lease_id", sa.String(length=64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("request_logs") as batch:
        batch.drop_column("lease_id")
