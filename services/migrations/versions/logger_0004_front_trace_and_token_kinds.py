"""request_logs: the caller's front, the trace id, cache-write and reasoning tokens.

``UsageEvent.front`` (http | grpc) and ``UsageEvent.trace_id`` are stored under their own names like
every other event field; ``Usage.cache_write_tokens`` and ``Usage.reasoning_tokens`` join the other
usage columns of the logs and of the hourly rollups. Rows written before have '' and 0. On PostgreSQL
the columns are added to the partitioned parent, and so to every partition.

Revision ID: logger_0004
Revises: logger_0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "logger_0004"
down_revision = "logger_0003"
branch_labels = None
depends_on = None

_COUNTERS = ("cache_write_tokens", "reasoning_tokens")


def _big() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("request_logs", sa.Column("front", sa.String(length=16), nullable=False, server_default=""))
    op.add_column(
        "request_logs", sa.Column("trace_id", sa.String(length=32), nullable=False, server_default="")
    )
    for table in ("request_logs", "usage_hourly"):
        for name in _COUNTERS:
            op.add_column(table, sa.Column(name, _big(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table, names in (
        ("usage_hourly", _COUNTERS),
        ("request_logs", ("front", "trace_id", *_COUNTERS)),
    ):
        with op.batch_alter_table(table) as batch:
            for name in names:
                batch.drop_column(name)
