"""Tables owned by the logger: one row per finished request, and hourly usage rollups of those rows.

On PostgreSQL ``request_logs`` is partitioned by range of ``occurred_at_ms``, one partition per UTC day
plus a default partition, so retention drops whole days (see :mod:`services.logger.partitions`). The
partitioning lives in the migration (``logger_0001``), not here: the ORM reads and writes the parent
table and never needs to know. On SQLite (the embedded default) it is a plain table.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base

HOUR_MS = 3_600_000
DAY_MS = 86_400_000


class RequestLog(Base):
    """The key includes the event time so the table can be time-partitioned; redelivered events carry
    the same time and id, so ``ON CONFLICT DO NOTHING`` on the key makes writes idempotent."""

    __tablename__ = "request_logs"
    __table_args__ = (
        Index("ix_request_logs_key_time", "key_id", "occurred_at_ms"),
        Index("ix_request_logs_user_time", "user_id", "occurred_at_ms"),
    )

    occurred_at_ms: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    user_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    upstream_model: Mapped[str] = mapped_column(String(200), default="")
    channel_id: Mapped[str] = mapped_column(String(40), default="")
    endpoint: Mapped[str] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    status_code: Mapped[int]
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(default=0)
    images: Mapped[int] = mapped_column(default=0)
    cache_write_tokens: Mapped[int] = mapped_column(default=0)
    reasoning_tokens: Mapped[int] = mapped_column(default=0)
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    cost_micros: Mapped[int] = mapped_column(default=0)
    price_id: Mapped[int] = mapped_column(default=0)
    reservation_id: Mapped[str] = mapped_column(String(64), default="")
    latency_ms: Mapped[int] = mapped_column(default=0)
    ttfb_ms: Mapped[int] = mapped_column(default=0)
    upstream_ms: Mapped[int] = mapped_column(default=0)
    end_reason: Mapped[str] = mapped_column(String(32), default="")
    error_type: Mapped[str] = mapped_column(String(16), default="")
    error_code: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(default=1)
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    # 0 for one request; N for a summary of N refusals made before the key was known (a flood).
    aggregated: Mapped[int] = mapped_column(default=0)
    # The credit lease the request was admitted on ('' when it held an exact reservation, or none).
    lease_id: Mapped[str] = mapped_column(String(64), default="")
    # http | grpc
    front: Mapped[str] = mapped_column(String(16), default="")
    # W3C trace id, '' when tracing was off.
    trace_id: Mapped[str] = mapped_column(String(32), default="")
    logged_at_ms: Mapped[int] = mapped_column(default=0)


class UsageHourly(Base):
    """Totals of the request logs per UTC hour, key, user and model; dashboards read these, never the logs.

    Maintained by the logger in the transaction that inserts the rows, from the rows that insert actually
    stored, so a redelivered event is never counted twice. A key belongs to one user, so ``user_id``
    adds no rows; it is part of the key so that per-user summaries need no join. Rollups are not subject
    to log retention: they keep counting after the raw rows of a day are dropped.
    """

    __tablename__ = "usage_hourly"
    __table_args__ = (
        Index("ix_usage_hourly_key_hour", "key_id", "hour_ms"),
        Index("ix_usage_hourly_user_hour", "user_id", "hour_ms"),
    )

    # Start of the UTC hour, unix milliseconds (a multiple of HOUR_MS).
    hour_ms: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(default=0)
    # Requests answered with an HTTP status of 400 or more.
    failed_requests: Mapped[int] = mapped_column(default=0)
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(default=0)
    images: Mapped[int] = mapped_column(default=0)
    cache_write_tokens: Mapped[int] = mapped_column(default=0)
    reasoning_tokens: Mapped[int] = mapped_column(default=0)
    cost_micros: Mapped[int] = mapped_column(default=0)
    # Sum of the requests' latencies: divided by ``requests`` it is the mean.
    latency_ms: Mapped[int] = mapped_column(default=0)


# The counters of a rollup row, in the order the writer fills them.
ROLLUP_COUNTERS: tuple[str, ...] = (
    "requests",
    "failed_requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "images",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_micros",
    "latency_ms",
)
