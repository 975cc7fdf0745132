"""Settings shared by every service.

Each service defines one ``Settings`` class deriving from the mixins it needs, builds it from the
``RELAYGATE_*`` environment in its ``main()`` and passes it down explicitly; nothing reads the
environment anywhere else. All services share one flat namespace, so one ConfigMap configures a
deployment: ``RELAYGATE_DATABASE_URL`` means the same thing to auth, quota and logger.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.credit import CreditTerms

Environment = Literal["dev", "prod"]

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///.relaygate/relaygate.db"

# SHA-256 of secret values that were once published (in code, docs or examples): whoever read them could
# sign admin tokens or rebuild key hashes, so they are refused in every environment. Only digests are kept.
_PUBLISHED_SECRET_DIGESTS = frozenset({"81c2f9cb35824bdd418d3d11d0602ab01b9ac212f662a172b0a45bde24d89b2d"})
MIN_SECRET_LENGTH = 32
# A random 32-character secret over hex has ~15 distinct characters; fewer than this is a pattern.
MIN_SECRET_DISTINCT = 10


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def normalize_database_url(url: str) -> str:
    """Pin the async driver: ``postgresql://`` becomes asyncpg, ``sqlite://`` becomes aiosqlite."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        return url
    raise ValueError(
        f"unsupported database URL scheme in {url.split('://', 1)[0]!r}: use postgresql or sqlite"
    )


class BaseServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    environment: Environment = "dev"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # host:port for the Prometheus endpoint of gRPC services; empty disables it.
    metrics_listen: str = ""


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    database_url: str = DEFAULT_SQLITE_URL
    # Comma-separated read replicas; reads fall back to the primary when none is healthy.
    database_replica_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    database_pool_size: int = Field(default=10, ge=1, le=200)
    database_max_overflow: int = Field(default=10, ge=0, le=200)
    # A replica further behind the primary than this is skipped until it catches up.
    replica_max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    replica_check_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _split_replicas(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("database_url")
    @classmethod
    def _normalize_primary(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator("database_replica_urls")
    @classmethod
    def _normalize_replicas(cls, value: list[str]) -> list[str]:
        return [normalize_database_url(v) for v in value]

    @model_validator(mode="after")
    def _replicas_match_primary(self) -> DatabaseSettings:
        if self.database_replica_urls and self.database_url.startswith("sqlite"):
            raise ValueError("read replicas need a PostgreSQL primary; SQLite has no replicas")
        return self


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic_prefix: str = "relaygate."
    kafka_partitions: int = Field(default=4, ge=1, le=1024)

    @property
    def usage_topic(self) -> str:
        return f"{self.kafka_topic_prefix}usage"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.kafka_topic_prefix}usage.dlq"


class KafkaConsumerSettings(KafkaSettings):
    """Group membership of a service that consumes the usage topic (the logger, quota's settling)."""

    # A consumer silent for the session timeout loses its partitions. Shorter means faster failover
    # but more spurious rebalances on a loaded machine.
    kafka_session_timeout_ms: int = Field(default=6000, ge=100, le=300_000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=10, le=100_000)

    @model_validator(mode="after")
    def _check_kafka_timing(self) -> KafkaConsumerSettings:
        if self.kafka_heartbeat_interval_ms >= self.kafka_session_timeout_ms:
            raise ValueError(
                "RELAYGATE_KAFKA_HEARTBEAT_INTERVAL_MS must be below RELAYGATE_KAFKA_SESSION_TIMEOUT_MS "
                f"(got {self.kafka_heartbeat_interval_ms} >= {self.kafka_session_timeout_ms}); "
                "a third of it is usual"
            )
        return self


class CreditSettings(BaseSettings):
    """The credit-control protocol's timing and sizing (``services.common.credit.CreditTerms``): one set
    per deployment, read by quota (grants, expiry) and by every relay (admission, syncs)."""

    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    # Relays admit requests of keys without RPM/TPM/concurrency limits on leases; false sends every
    # request through an exact per-request Reserve.
    credit_leases: bool = True
    credit_sync_interval_ms: int = Field(default=1_000, ge=50, le=60_000)
    # How long a grant lets a relay admit without hearing from quota (a quota outage shorter than
    # this, minus the margin, fails no request of a leased key).
    credit_valid_for_ms: int = Field(default=30_000, ge=1_000, le=600_000)
    credit_margin_ms: int = Field(default=2_000, ge=0, le=60_000)
    credit_grace_ms: int = Field(default=5_000, ge=0, le=600_000)
    # Usage a vanished relay reported stays held this long, waiting for its events.
    credit_horizon_ms: int = Field(default=3_600_000, ge=1_000)
    # A lease aims to cover this much of its key's recent spend.
    credit_target_ms: int = Field(default=15_000, ge=100, le=600_000)
    credit_idle_ms: int = Field(default=10_000, ge=100, le=3_600_000)

    def credit_terms(self) -> CreditTerms:
        return CreditTerms(
            sync_interval_ms=self.credit_sync_interval_ms,
            valid_for_ms=self.credit_valid_for_ms,
            margin_ms=self.credit_margin_ms,
            grace_ms=self.credit_grace_ms,
            horizon_ms=self.credit_horizon_ms,
            target_ms=self.credit_target_ms,
            idle_ms=self.credit_idle_ms,
        )


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    # Empty: the embedded default, where caches stay in process.
    redis_url: str = ""


class GrpcServerSettings(BaseSettings):
    """How a gRPC service listens and drains."""

    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    # Seconds in-flight RPCs get to finish after SIGTERM; keep below the pod's grace period.
    grpc_drain_seconds: float = Field(default=10.0, ge=0, le=300)


class ServiceAddresses(BaseSettings):
    """Where the gRPC services are, for their clients."""

    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    auth_addr: str = "127.0.0.1:50051"
    quota_addr: str = "127.0.0.1:50052"
    logger_addr: str = "127.0.0.1:50053"
    # Deadline for calls on the request path; auth and quota must answer well within it.
    rpc_timeout_s: float = Field(default=2.0, gt=0, le=60)


def check_secrets(environment: Environment, **secrets: str) -> None:
    """Refuse a secret that is unset or was published anywhere; in prod, also one that is short or patterned.

    There is deliberately no default value: every code path that signs or hashes uses a value the
    operator (or ``relaygate up``, which generates and keeps its own) chose.
    """
    for name, value in secrets.items():
        variable = f"RELAYGATE_{name.upper()}"
        if not value:
            raise ValueError(
                f"{variable} is not set: give it a private random value of at least {MIN_SECRET_LENGTH} "
                "characters (e.g. `openssl rand -hex 32`); `relaygate up` generates its own"
            )
        if hashlib.sha256(value.encode()).hexdigest() in _PUBLISHED_SECRET_DIGESTS:
            raise ValueError(f"{variable} holds a published value; set a private random one")
        if environment != "prod":
            continue
        if len(value) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"{variable} must be at least {MIN_SECRET_LENGTH} characters when environment=prod"
            )
        if len(set(value)) < MIN_SECRET_DISTINCT:
            raise ValueError(f"{variable} looks like a pattern, not a random value; generate one")


class GrpcTlsSettings(BaseSettings):
    """Mutual TLS on internal gRPC, for servers and clients alike (see ``services.common.tls``)."""

    model_config = SettingsConfigDict(env_prefix="RELAYGATE_", extra="ignore", frozen=True)

    # false (RELAYGATE_GRPC_TLS=off) only for local development: plaintext, every caller trusted;
    # refused with RELAYGATE_ENVIRONMENT=prod.
    grpc_tls: bool = True
    # This process's certificate: a directory holding tls.crt, tls.key and ca.crt (cert-manager's names).
    grpc_tls_dir: str = ""


class GrpcSecuritySettings(GrpcTlsSettings):
    """What a gRPC server adds: the kubelet's probe port and how admin tokens are checked."""

    # host:port of a plaintext port serving only grpc.health.v1, for probes that present no client
    # certificate (Kubernetes' grpc probe); empty: none.
    grpc_health_listen: str = ""
    # How long an admin token auth accepted is trusted again without asking (0: ask every call).
    # Revoking the token's key takes effect on the internal APIs within this long.
    admin_token_cache_s: float = Field(default=2.0, ge=0, le=60)
