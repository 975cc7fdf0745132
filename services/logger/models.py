"""Tables owned by the logger: one row per finished request, written in batches from Kafka."""

from __future__ import annotations

from sqlalchemy import Boolean, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from services.common.db import Base


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
    logged_at_ms: Mapped[int] = mapped_column(default=0)
