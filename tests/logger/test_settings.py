"""LoggerSettings: defaults, and the values it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common.batch import BatchPolicy
from services.logger.partitions import PartitionPolicy
from services.logger.settings import LoggerSettings


def test_defaults() -> None:
    settings = LoggerSettings.model_validate({})
    assert settings.logger_listen == "127.0.0.1:50053"
    assert settings.logger_group_id == "relaygate-logger"
    assert settings.batch_policy == BatchPolicy(max_rows=5000, max_seconds=1.0)
    assert (settings.kafka_session_timeout_ms, settings.kafka_heartbeat_interval_ms) == (6000, 1000)
    # Logs are never dropped unless retention is configured; partitions exist a week ahead.
    assert settings.partition_policy == PartitionPolicy(days_ahead=7, retention_days=0)
    assert settings.log_maintenance_interval_s == 3600


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param({"batch_max_rows": 0}, "batch_max_rows", id="empty batches"),
        pytest.param({"batch_max_seconds": 0}, "batch_max_seconds", id="zero batch time"),
        pytest.param(
            {"kafka_session_timeout_ms": 1000, "kafka_heartbeat_interval_ms": 1000},
            "HEARTBEAT_INTERVAL_MS must be below",
            id="heartbeat not below session timeout",
        ),
        pytest.param({"logger_group_id": " "}, "GROUP_ID", id="blank group"),
        pytest.param({"logger_listen": ""}, "LOGGER_LISTEN", id="blank listen"),
        pytest.param({"log_retention_days": -1}, "log_retention_days", id="negative retention"),
        pytest.param({"log_partitions_ahead_days": 0}, "log_partitions_ahead_days", id="no partition ahead"),
        pytest.param({"log_maintenance_interval_s": 0}, "log_maintenance_interval_s", id="no interval"),
    ],
)
def test_refuses_unsafe_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LoggerSettings.model_validate(values)


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYGATE_BATCH_MAX_ROWS", "250")
    monkeypatch.setenv("RELAYGATE_LOGGER_GROUP_ID", "logger-b")
    monkeypatch.setenv("RELAYGATE_LOG_RETENTION_DAYS", "90")
    monkeypatch.setenv("RELAYGATE_LOG_PARTITIONS_AHEAD_DAYS", "3")
    settings = LoggerSettings()
    assert settings.batch_max_rows == 250
    assert settings.logger_group_id == "logger-b"
    assert settings.partition_policy == PartitionPolicy(days_ahead=3, retention_days=90)
