"""Catalog tests run on a fresh, migrated PostgreSQL primary + replica per module."""

from __future__ import annotations

import pytest

from services.catalog.store import Catalog
from services.common.clock import ManualClock
from services.common.db import Database
from tests.db_fixtures import database, migrated_db  # noqa: F401


@pytest.fixture
def catalog(database: Database) -> Catalog:  # noqa: F811
    return Catalog(database, clock=ManualClock())
