from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.config import DatabaseSettings, check_secrets


def test_env_builds_database_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYGATE_DATABASE_URL", "postgresql://u@db:5432/rg")
    monkeypatch.setenv("RELAYGATE_DATABASE_REPLICA_URLS", "postgresql://u@r1/rg, postgresql://u@r2/rg")
    settings = DatabaseSettings()
    assert settings.database_url == "postgresql+asyncpg://u@db:5432/rg"
    assert settings.database_replica_urls == ["postgresql+asyncpg://u@r1/rg", "postgresql+asyncpg://u@r2/rg"]


def test_replicas_need_postgres() -> None:
    with pytest.raises(ValidationError, match="read replicas need a PostgreSQL primary"):
        DatabaseSettings(database_url="sqlite:///x.db", database_replica_urls=["postgresql://r/rg"])


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValidationError, match="unsupported database URL scheme"):
        DatabaseSettings(database_url="mysql://x/y")


def test_secrets_are_required_and_strong_in_prod() -> None:
    with pytest.raises(ValueError, match="RELAYGATE_KEY_PEPPER is not set"):
        check_secrets("dev", key_pepper="")
    check_secrets("dev", key_pepper="short")
    with pytest.raises(ValueError, match="at least 32"):
        check_secrets("prod", key_pepper="short")
    with pytest.raises(ValueError, match="pattern"):
        check_secrets("prod", key_pepper="x" * 40)
    check_secrets("prod", key_pepper="0123456789abcdef" * 2)
