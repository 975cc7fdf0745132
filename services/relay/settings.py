"""Relay settings: the HTTP front, the upstream pools, streams, breakers, the response cache and where
auth, quota, the catalog and Kafka are. Built once in ``main()`` from ``RELAYGATE_*`` and passed down."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.config import (
    BaseServiceSettings,
    CreditSettings,
    GrpcServerSettings,
    GrpcTlsSettings,
    KafkaSettings,
    RedisSettings,
    ServiceAddresses,
)


class RelaySettings(
    BaseServiceSettings,
    KafkaSettings,
    RedisSettings,
    ServiceAddresses,
    CreditSettings,
    GrpcTlsSettings,
    GrpcServerSettings,
):
    relay_host: str = "127.0.0.1"
    relay_port: int = Field(default=8080, ge=0, le=65535)
    # host:port of the gRPC front (relaygate.relay.v1.InferenceService, services/relay/edge/grpc);
    # empty: HTTP only. Its in-flight calls get grpc_drain_seconds on SIGTERM.
    relay_grpc_listen: str = ""
    # Request bodies above this are refused with 413 before they are parsed.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Bounds of everything a client controls, checked at the edge before any RPC (see README "Errors").
    # JSON nesting: a tools schema nested 20 levels deep is ~45 levels of body; 64 leaves room for real
    # schemas and stays far below what the relay's own recursion (orjson's serializer stops at 254
    # levels, protobuf's JSON parser at 100) could not handle.
    max_json_depth: int = Field(default=64, ge=8, le=100)
    # Array lengths: chat messages, tool (and legacy function) definitions, and the items of an
    # embeddings ``input`` or completions ``prompt`` (a single array of token ids is one item).
    max_messages: int = Field(default=2048, ge=1)
    max_tools: int = Field(default=128, ge=1)
    max_input_items: int = Field(default=2048, ge=1)
    # Request heads (request line and headers): total bytes and header count; beyond either, 431.
    max_header_bytes: int = Field(default=32 * 1024, ge=4096, le=1024 * 1024)
    max_header_count: int = Field(default=100, ge=16, le=1000)
    # A connection must deliver a request's head within header_timeout_s of its first byte (or of
    # connecting), and its body within body_timeout_s of the head; otherwise 408 and it is closed.
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Streams one key may hold open at once on this relay process (quota's own concurrency limit of
    # the key still applies across relays); beyond it, 429 with Retry-After.
    max_streams_per_key: int = Field(default=64, ge=1)
    # The verified-key cache (services/relay/pipeline/principals.py). While the relay follows auth's key
    # changes on Redis, a verified key is trusted for auth_cache_ttl_s (every change drops it at once;
    # the TTL only bounds changes made outside auth); without Redis, or while its subscription is down,
    # for auth_cache_fallback_ttl_s. At most auth_cache_max_entries keys, least recently used evicted.
    auth_cache_ttl_s: float = Field(default=300.0, ge=0, le=3600)
    auth_cache_fallback_ttl_s: float = Field(default=5.0, ge=0, le=300)
    auth_cache_max_entries: int = Field(default=100_000, ge=1, le=10_000_000)
    # How often the channel table is checked for changes (a cheap revision compare).
    channel_refresh_s: float = Field(default=1.0, gt=0, le=300)

    # Upstream pools, one per channel. A channel's own max_connections (catalog) applies, capped here.
    upstream_max_connections: int = Field(default=1000, ge=1)
    # Idle keep-alive connections kept per channel; the rest are closed when their request ends.
    upstream_max_keepalive: int = Field(default=200, ge=0)
    upstream_keepalive_expiry_s: float = Field(default=30.0, ge=0)
    # HTTP/2 to every channel (ALPN on https, prior knowledge on http); HTTP/1.1 otherwise.
    upstream_http2: bool = False
    # Attempts across channels for one request (the first try included).
    max_attempts: int = Field(default=3, ge=1, le=10)

    # Streams: the longest silence between two upstream chunks, the interval of keep-alive comments
    # sent to the client while the upstream is silent, and how long an abandoned stream is still read
    # for its usage (at most stream_max_drains at once; beyond that the usage is estimated).
    stream_idle_timeout_s: float = Field(default=120.0, gt=0)
    stream_keepalive_s: float = Field(default=15.0, gt=0)
    stream_drain_s: float = Field(default=10.0, ge=0)
    stream_max_drains: int = Field(default=1000, ge=0)

    # Circuit breaker per channel: opens when, over the last breaker_window_s, at least
    # breaker_min_requests attempts were made and breaker_failure_ratio of them failed; after
    # breaker_open_s (doubling after each failed probe, up to breaker_max_open_s) one probe request
    # is let through. Overload answers (429, 529) only pause the channel for their Retry-After
    # (breaker_throttle_s when absent).
    breaker_window_s: float = Field(default=30.0, gt=0)
    breaker_min_requests: int = Field(default=5, ge=1)
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_open_s: float = Field(default=5.0, gt=0)
    breaker_max_open_s: float = Field(default=60.0, gt=0)
    breaker_throttle_s: float = Field(default=1.0, ge=0)
    # 5xx answers (not connect errors or timeouts) count towards opening only once this many distinct
    # keys got them within the window: one caller's poison bodies cannot open a shared breaker.
    breaker_min_callers: int = Field(default=2, ge=1)

    # Response cache (Redis; off without RELAYGATE_REDIS_URL). Hits are free or billed in full.
    response_cache_ttl_s: int = Field(default=3600, ge=1)
    response_cache_max_bytes: int = Field(default=1024 * 1024, ge=1)
    response_cache_billing: Literal["free", "full"] = "free"
    # Whose requests share entries: each key its own, or all keys of one user.
    response_cache_scope: Literal["key", "user"] = "key"

    # Usage events: the in-memory queue in front of the producer, and the on-disk spool that takes
    # over while Kafka is unreachable (replayed in order later). A full spool drops new events
    # (counted); the ledger, not the log, is the record of money.
    events_enabled: bool = True
    event_queue_max: int = Field(default=10_000, ge=1)
    event_spool_dir: str = ".relaygate/spool"
    event_spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Acknowledged events kept this long and replayed if the broker turns out to have lost them.
    event_retain_s: float = Field(default=30.0, ge=0)
    # On SIGTERM: how long queued events may take to reach Kafka before the rest goes to the spool.
    event_shutdown_timeout_s: float = Field(default=5.0, ge=0)

    # Without a usage topic (RELAYGATE_KAFKA_BOOTSTRAP empty) reservations are settled by RPC: a settle
    # or release quota could not answer is retried in the background (backoff with jitter) for this
    # long, then given up: the hold expires in quota and charges nothing. Keep it well under quota's
    # RELAYGATE_RESERVATION_TTL_S. On SIGTERM, pending retries get settle_shutdown_s. With a usage
    # topic, the usage event settles the reservation and neither applies.
    settle_retry_s: float = Field(default=30.0, gt=0, le=3600)
    settle_shutdown_s: float = Field(default=10.0, ge=0, le=3600)

    # Requests admitted on leases (RELAYGATE_CREDIT_*) are priced by the relay itself, from quota's price
    # list reloaded this often; a price change reaches leased requests within it.
    price_refresh_s: float = Field(default=5.0, gt=0, le=300)
    # On SIGTERM: how long the relay keeps syncing to give its leases back (quota expires the rest).
    credit_shutdown_s: float = Field(default=2.0, ge=0, le=60)

    # On SIGTERM: requests in flight get http_drain_s to finish (then their connections are closed and
    # their handlers cancelled), and the whole way out, the lifespan's steps included, at most
    # shutdown_timeout_s: past it the relay writes every thread's stack to its log and exits. Keep
    # shutdown_timeout_s under the pod's grace period (after preStop) and http_drain_s well under it.
    http_drain_s: float = Field(default=30.0, ge=0, le=600)
    shutdown_timeout_s: float = Field(default=50.0, gt=0, le=3600)

    # Image URLs of chat requests routed to Gemini channels are fetched by the relay and sent inline
    # (services/relay/upstream/fetch.py): https only unless fetch_allow_http; never from loopback,
    # private, link-local, multicast, reserved or unspecified addresses, except the hosts named in
    # fetch_allow_hosts (comma-separated; empty by default: for tests and private deployments whose
    # images are on an internal host). At most fetch_max_redirects hops, fetch_max_bytes per image,
    # fetch_timeout_s per image, fetch_max_images per request, and a Content-Type among fetch_image_types.
    fetch_allow_http: bool = False
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fetch_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, le=100 * 1024 * 1024)
    fetch_timeout_s: float = Field(default=10.0, gt=0, le=120)
    fetch_max_redirects: int = Field(default=3, ge=0, le=10)
    fetch_max_images: int = Field(default=16, ge=1, le=256)
    fetch_image_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "image/png",
            "image/jpeg",
            "image/webp",
            "image/heic",
            "image/heif",
            "image/gif",
        ]
    )

    # Prefer X-Forwarded-For's first address as the client IP (only behind a trusted proxy).
    trust_forwarded_for: bool = False

    # Where CatalogService is; empty = quota's address, the process that hosts it by default.
    catalog_addr: str = ""

    @property
    def catalog_address(self) -> str:
        return self.catalog_addr or self.quota_addr

    @field_validator("fetch_allow_hosts", "fetch_image_types", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> RelaySettings:
        if self.breaker_max_open_s < self.breaker_open_s:
            raise ValueError("RELAYGATE_BREAKER_MAX_OPEN_S must not be below RELAYGATE_BREAKER_OPEN_S")
        if self.http_drain_s + self.grpc_drain_seconds >= self.shutdown_timeout_s:
            # The gRPC front drains after HTTP, and the lifespan's other steps (the spool, the leases
            # given back) run after both.
            raise ValueError(
                "RELAYGATE_HTTP_DRAIN_S + RELAYGATE_GRPC_DRAIN_SECONDS must be below "
                "RELAYGATE_SHUTDOWN_TIMEOUT_S"
            )
        return self
