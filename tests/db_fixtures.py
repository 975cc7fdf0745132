"""Database fixtures: a fresh, migrated PostgreSQL database (primary + replica) per test module, and one
for the session's shared deployment (tests/deployments.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from devinfra.backing import BackingServices
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.migrations import upgrade


@dataclass(frozen=True)
class DbUrls:
    primary: str
    replica: str

    def settings(self, **overrides: object) -> DatabaseSettings:
        values: dict[str, object] = {"database_url": self.primary, "database_replica_urls": [self.replica]}
        values.update(overrides)
        return DatabaseSettings.model_validate(values)


@pytest.fixture(scope="module")
async def migrated_db(backing: BackingServices, request: pytest.FixtureRequest) -> DbUrls:
    """A new database named after the test module, migrated to head, visible on the replica."""
    name = re.sub(r"[^a-z0-9_]", "_", request.module.__name__.lower())[-50:]
    primary, replica = backing.create_database(f"t_{name}")
    await upgrade(primary)
    return DbUrls(primary, replica)


@pytest.fixture(scope="session")
async def shared_db(backing: BackingServices) -> DbUrls:
    """One migrated database for the session: the modules that share a deployment share it too (each
    test makes its own users, keys and channels there)."""
    primary, replica = backing.create_database("t_shared_deployment")
    await upgrade(primary)
    return DbUrls(primary, replica)


@pytest.fixture
async def database(migrated_db: DbUrls) -> AsyncIterator[Database]:
    """A started :class:`Database` routing reads to the replica."""
    db = Database(migrated_db.settings())
    await db.start()
    try:
        yield db
    finally:
        await db.close()
