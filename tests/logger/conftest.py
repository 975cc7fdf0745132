"""Fixtures of the logger tests: a migrated PostgreSQL database (primary + replica) per module, and
settings that point the logger at it and at unique Kafka topics and a unique consumer group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from devinfra.backing import BackingServices
from services.logger.settings import LoggerSettings
from tests.db_fixtures import DbUrls, database, migrated_db  # noqa: F401
from tests.logger.factories import unique
from tests.tls import tls_dir


@pytest.fixture
def logger_settings(
    backing: BackingServices,
    migrated_db: DbUrls,  # noqa: F811 (the fixture imported above)
) -> Callable[..., LoggerSettings]:
    """Build settings for one test: same topics and group on every call, so a second call restarts."""
    prefix = f"{unique('t')}."
    group = unique("g")

    def make(**overrides: Any) -> LoggerSettings:
        values: dict[str, Any] = {
            "database_url": migrated_db.primary,
            "database_replica_urls": [migrated_db.replica],
            "kafka_bootstrap": backing.kafka_bootstrap,
            "kafka_topic_prefix": prefix,
            "logger_group_id": group,
            "logger_listen": "127.0.0.1:0",
            "grpc_tls_dir": tls_dir("logger"),
            # Short, so a killed member is evicted quickly, but not 1 s: the broker then evicted a
            # consumer whose loop was busy writing a 5,000-row batch on two loaded cores.
            "kafka_session_timeout_ms": 3000,
            "kafka_heartbeat_interval_ms": 300,
            "batch_max_seconds": 0.2,
            "grpc_drain_seconds": 0.5,
            "logger_write_timeout_s": 5.0,
            "logger_shutdown_timeout_s": 5.0,
        }
        values.update(overrides)
        return LoggerSettings.model_validate(values)

    return make
