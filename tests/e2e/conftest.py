"""The deployment every e2e module runs against: the four services as separate processes on a fresh
database (primary + replica) of the module, the session's Redis and Kafka, and a fake upstream channel.

A module that needs relay settings of its own overrides ``relay_env``::

    @pytest.fixture(scope="module")
    def relay_env() -> dict[str, str]:
        return {"RELAYGATE_MAX_BODY_BYTES": "65536"}
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import Deployment, deploy


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    """Extra ``RELAYGATE_*`` settings for the relay of the module's deployment (none by default)."""
    return {}


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices,
    migrated_db: DbUrls,
    relay_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """One deployment per module, stopped after its last test."""
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("stack-logs"), relay_env=relay_env) as running:
        yield running
