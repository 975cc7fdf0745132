"""Quota tests run on a fresh, migrated PostgreSQL primary + replica per module."""

from tests.db_fixtures import database, migrated_db  # noqa: F401
from tests.quota.fixtures import clock, ledger, prices  # noqa: F401
