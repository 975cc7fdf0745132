"""Configuration of the logger service (``RELAYGATE_*`` environment, one flat namespace)."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.common.batch import BatchPolicy
from services.common.config import (
    BaseServiceSettings,
    DatabaseSettings,
    GrpcSecuritySettings,
    GrpcServerSettings,
    KafkaConsumerSettings,
    RedisSettings,
    ServiceAddresses,
)
from services.logger.partitions import PartitionPolicy


class LoggerSettings(
    BaseServiceSettings,
    DatabaseSettings,
    KafkaConsumerSettings,
    GrpcServerSettings,
    # Admin tokens presented to the logger are checked by auth, at RELAYGATE_AUTH_ADDR.
    GrpcSecuritySettings,
    ServiceAddresses,
    # Optional: where the logger posts its performance snapshot (lag, batches) for the admin view.
    RedisSettings,
):
    """Everything the logger process needs; built once in ``main()`` and passed down.

    On shutdown the gRPC server drains for ``grpc_drain_seconds`` while the consumer writes its last
    batch, retrying for ``logger_shutdown_timeout_s`` (each attempt bounded by ``logger_write_timeout_s``).
    The pod's termination grace period must be longer than either.
    """

    logger_listen: str = "127.0.0.1:50053"
    logger_group_id: str = "relaygate-logger"
    # A batch is written when it holds this many rows, or this long after its first message.
    batch_max_rows: int = Field(default=5000, ge=1, le=100_000)
    batch_max_seconds: float = Field(default=1.0, gt=0, le=300)
    # One attempt at writing and committing a batch; a slower attempt counts as failed and is retried.
    # A 5,000-row batch takes ~0.15 s on PostgreSQL.
    logger_write_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # On shutdown, how long the last batch may keep retrying before it is left uncommitted (its events
    # are then redelivered to the next consumer, never lost).
    logger_shutdown_timeout_s: float = Field(default=10.0, ge=0, le=600)
    # Request logs are kept this many whole UTC days (on PostgreSQL by dropping day partitions); 0 keeps
    # them forever. Usage rollups are never dropped.
    log_retention_days: int = Field(default=0, ge=0, le=36_500)
    # Day partitions are created this many days ahead, so that a maintenance pass may fail for that long
    # before rows start landing in the default partition.
    log_partitions_ahead_days: int = Field(default=7, ge=1, le=365)
    # How often partition maintenance (creating ahead, dropping past retention) runs.
    log_maintenance_interval_s: float = Field(default=3600.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _check_names(self) -> LoggerSettings:
        if not self.logger_listen.strip():
            raise ValueError("RELAYGATE_LOGGER_LISTEN must be host:port")
        if not self.logger_group_id.strip():
            raise ValueError("RELAYGATE_LOGGER_GROUP_ID must not be empty: offsets are stored per group")
        return self

    @property
    def batch_policy(self) -> BatchPolicy:
        return BatchPolicy(max_rows=self.batch_max_rows, max_seconds=self.batch_max_seconds)

    @property
    def partition_policy(self) -> PartitionPolicy:
        return PartitionPolicy(
            days_ahead=self.log_partitions_ahead_days, retention_days=self.log_retention_days
        )
