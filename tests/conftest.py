"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from devinfra.backing import SETUP_HINT, BackingServices, missing_binaries
from services.common.redis import redis_client

pytest_plugins = ["tests.db_fixtures", "tests.deployments"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "shared_stack: the module runs on the session's shared e2e deployment (tests/deployments.py)",
    )


# ======================================================================================================
# Backing services: PostgreSQL primary + streaming replica, Redis, Apache Kafka. See devinfra/.
#
# One set per test session; isolate tests with backing.create_database(...), unique Redis key prefixes,
# and unique Kafka topics and group ids.
# ======================================================================================================


def _infra_required() -> bool:
    """CI sets RELAYGATE_REQUIRE_INFRA=1: there, a missing server binary is a failure, never a skip."""
    return os.environ.get("RELAYGATE_REQUIRE_INFRA") == "1"


@pytest.fixture(scope="session")
def backing() -> Iterator[BackingServices]:
    """Running backing services for the session; stopped, and their temp directory removed, at the end."""
    missing = missing_binaries()
    if missing:
        reason = f"backing services need {', '.join(missing)}, which are missing; {SETUP_HINT}"
        if _infra_required():
            pytest.fail(f"{reason} (RELAYGATE_REQUIRE_INFRA=1)", pytrace=False)
        else:
            pytest.skip(f"{reason} (skipped because RELAYGATE_REQUIRE_INFRA is not 1)")
    services = BackingServices().start()
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture
def broker(backing: BackingServices) -> Iterator[BackingServices]:
    """The session's services, for a test that stops, kills or erases the broker: it runs again after
    the test whatever happened to it."""
    try:
        yield backing
    finally:
        backing.start_kafka()


@pytest.fixture
async def redis(backing: BackingServices) -> AsyncIterator[Redis]:
    """A client of the session's Redis; tests keep to key prefixes of their own."""
    client = redis_client(backing.redis_url)
    try:
        yield client
    finally:
        await client.aclose()
