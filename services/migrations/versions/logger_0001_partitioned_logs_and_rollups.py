"""logger: request_logs partitioned by day on PostgreSQL, hourly usage rollups

On PostgreSQL the plain ``request_logs`` of revision 0001 becomes a table partitioned by range of
``occurred_at_ms`` with a default partition (so an insert never fails for lack of a partition). Rows
already stored are moved into one partition per UTC day they cover. Partitions for the days ahead are
the logger's job (``services.logger.partitions``), not the migration's. SQLite keeps the plain table.

Both dialects get ``usage_hourly``, the per hour/key/user/model totals the logger maintains. Rows logged
before this revision are rolled up here, so the rollups start out equal to an aggregate over the logs.

Revision ID: logger_0001
Revises: 0001
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op

revision = "logger_0001"
down_revision = "0001"
branch_labels = ("logger",)
depends_on = None

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
# Days outside these years stay in the default partition (a partition name needs a 4-digit year).
_FIRST_YEAR, _LAST_YEAR = 2000, 9998


def _bigint() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _request_log_columns() -> list[sa.Column[object]]:
    """The columns of revision 0001, unchanged."""
    big = _bigint
    return [
        sa.Column("occurred_at_ms", big(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("upstream_model", sa.String(length=200), nullable=False),
        sa.Column("channel_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status_code", big(), nullable=False),
        sa.Column("prompt_tokens", big(), nullable=False),
        sa.Column("completion_tokens", big(), nullable=False),
        sa.Column("cached_prompt_tokens", big(), nullable=False),
        sa.Column("images", big(), nullable=False),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("cost_micros", big(), nullable=False),
        sa.Column("price_id", big(), nullable=False),
        sa.Column("reservation_id", sa.String(length=64), nullable=False),
        sa.Column("latency_ms", big(), nullable=False),
        sa.Column("ttfb_ms", big(), nullable=False),
        sa.Column("upstream_ms", big(), nullable=False),
        sa.Column("end_reason", sa.String(length=32), nullable=False),
        sa.Column("error_type", sa.String(length=16), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=False),
        sa.Column("attempts", big(), nullable=False),
        sa.Column("client_ip", sa.String(length=64), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("logged_at_ms", big(), nullable=False),
    ]


_COLUMN_LIST = ", ".join(column.name for column in _request_log_columns())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        _partition_request_logs(bind)
    _create_usage_hourly()
    _roll_up_existing_logs()


def downgrade() -> None:
    op.drop_index("ix_usage_hourly_user_hour", table_name="usage_hourly")
    op.drop_index("ix_usage_hourly_key_hour", table_name="usage_hourly")
    op.drop_table("usage_hourly")
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_request_logs()


# --- PostgreSQL: partitioning --------------------------------------------------------------------------


def _partition_request_logs(bind: sa.Connection) -> None:
    # The old table steps aside under other names (index and constraint names are schema-wide).
    op.rename_table("request_logs", "request_logs_unpartitioned")
    op.execute(
        "ALTER TABLE request_logs_unpartitioned "
        "RENAME CONSTRAINT pk_request_logs TO pk_request_logs_unpartitioned"
    )
    op.drop_index("ix_request_logs_key_time", table_name="request_logs_unpartitioned")
    op.drop_index("ix_request_logs_user_time", table_name="request_logs_unpartitioned")

    op.create_table(
        "request_logs",
        *_request_log_columns(),
        sa.PrimaryKeyConstraint("occurred_at_ms", "event_id", name="pk_request_logs"),
        postgresql_partition_by="RANGE (occurred_at_ms)",
    )
    _create_request_log_indexes()
    op.execute("CREATE TABLE request_logs_default PARTITION OF request_logs DEFAULT")
    days = bind.execute(
        sa.text("SELECT DISTINCT occurred_at_ms / :day FROM request_logs_unpartitioned"), {"day": _DAY_MS}
    ).scalars()
    for day in sorted(int(d) for d in days):
        start = datetime.datetime.fromtimestamp(day * _DAY_MS / 1000, datetime.UTC) if day >= 0 else None
        if start is None or not _FIRST_YEAR <= start.year <= _LAST_YEAR:
            continue
        op.execute(
            f"CREATE TABLE request_logs_p{start:%Y%m%d} PARTITION OF request_logs "
            f"FOR VALUES FROM ({day * _DAY_MS}) TO ({(day + 1) * _DAY_MS})"
        )
    op.execute(
        f"INSERT INTO request_logs ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM request_logs_unpartitioned"
    )
    op.drop_table("request_logs_unpartitioned")


def _unpartition_request_logs() -> None:
    op.rename_table("request_logs", "request_logs_partitioned")
    op.execute(
        "ALTER TABLE request_logs_partitioned "
        "RENAME CONSTRAINT pk_request_logs TO pk_request_logs_partitioned"
    )
    op.drop_index("ix_request_logs_key_time", table_name="request_logs_partitioned")
    op.drop_index("ix_request_logs_user_time", table_name="request_logs_partitioned")
    op.create_table(
        "request_logs",
        *_request_log_columns(),
        sa.PrimaryKeyConstraint("occurred_at_ms", "event_id", name="pk_request_logs"),
    )
    _create_request_log_indexes()
    op.execute(
        f"INSERT INTO request_logs ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM request_logs_partitioned"
    )
    # Dropping the parent drops every partition with it.
    op.drop_table("request_logs_partitioned")


def _create_request_log_indexes() -> None:
    op.create_index("ix_request_logs_key_time", "request_logs", ["key_id", "occurred_at_ms"])
    op.create_index("ix_request_logs_user_time", "request_logs", ["user_id", "occurred_at_ms"])


# --- both dialects: rollups ----------------------------------------------------------------------------


def _create_usage_hourly() -> None:
    big = _bigint
    op.create_table(
        "usage_hourly",
        sa.Column("hour_ms", big(), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("requests", big(), nullable=False),
        sa.Column("failed_requests", big(), nullable=False),
        sa.Column("prompt_tokens", big(), nullable=False),
        sa.Column("completion_tokens", big(), nullable=False),
        sa.Column("cached_prompt_tokens", big(), nullable=False),
        sa.Column("images", big(), nullable=False),
        sa.Column("cost_micros", big(), nullable=False),
        sa.Column("latency_ms", big(), nullable=False),
        sa.PrimaryKeyConstraint("hour_ms", "key_id", "user_id", "model", name="pk_usage_hourly"),
    )
    op.create_index("ix_usage_hourly_key_hour", "usage_hourly", ["key_id", "hour_ms"])
    op.create_index("ix_usage_hourly_user_hour", "usage_hourly", ["user_id", "hour_ms"])


def _roll_up_existing_logs() -> None:
    op.execute(
        "INSERT INTO usage_hourly (hour_ms, key_id, user_id, model, requests, failed_requests, "
        "prompt_tokens, completion_tokens, cached_prompt_tokens, images, cost_micros, latency_ms) "
        f"SELECT occurred_at_ms - occurred_at_ms % {_HOUR_MS}, key_id, user_id, model, count(*), "
        "sum(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens), sum(completion_tokens), "
        "sum(cached_prompt_tokens), sum(images), sum(cost_micros), sum(latency_ms) "
        f"FROM request_logs GROUP BY occurred_at_ms - occurred_at_ms % {_HOUR_MS}, key_id, user_id, model"
    )
