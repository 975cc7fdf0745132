"""Fixtures for the auth tests: a migrated database per module, a real Redis, and a running auth server."""

from tests.auth.harness import auth, store  # noqa: F401
from tests.db_fixtures import database, migrated_db  # noqa: F401
