"""Relay settings: the HTTP front, its upstream pool, and where auth, quota and Kafka are."""

from __future__ import annotations

from pydantic import Field

from services.common.config import BaseServiceSettings, KafkaSettings, RedisSettings, ServiceAddresses


class RelaySettings(BaseServiceSettings, KafkaSettings, RedisSettings, ServiceAddresses):
    relay_host: str = "127.0.0.1"
    relay_port: int = Field(default=8080, ge=0, le=65535)
    # Request bodies above this are refused with 413 before they are parsed.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # How long a verified key is trusted without asking auth again (revocations also arrive by pub/sub).
    auth_cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    # How often the channel table is checked for changes (a cheap revision compare).
    channel_refresh_s: float = Field(default=1.0, gt=0, le=300)
    # Upstream pool: per-process limits shared by every channel.
    upstream_max_connections: int = Field(default=1000, ge=1)
    upstream_max_keepalive: int = Field(default=200, ge=0)
    upstream_keepalive_expiry_s: float = Field(default=30.0, ge=0)
    upstream_http2: bool = False
    # Attempts across channels for one request (the first try included).
    max_attempts: int = Field(default=3, ge=1, le=10)
    # Prefer X-Forwarded-For's first address as the client IP (only behind a trusted proxy).
    trust_forwarded_for: bool = False
    # Disable to run without Kafka (events are then only logged); the full path keeps it on.
    events_enabled: bool = True
