"""The deployment every e2e (and console) module runs against: the four services as separate processes, the
session's Redis and Kafka, and a fake upstream channel serving :data:`tests.e2e.stack.MODEL`.

A module marked ``shared_stack`` (``pytestmark = pytest.mark.shared_stack``) runs on the session's
shared deployment (see :class:`tests.e2e.stack.SharedStack` for what such a module may change); any
other module gets a deployment of its own on a fresh database, stopped after its last test.

A module that needs relay settings of its own overrides ``relay_env`` (on the shared deployment it
then gets a relay process with them)::

    @pytest.fixture(scope="module")
    def relay_env() -> dict[str, str]:
        return {"RELAYGATE_MAX_BODY_BYTES": "65536"}

Registered once for the whole suite (``pytest_plugins`` in ``tests/conftest.py``): a conftest that
imported these fixtures would define a second ``shared_stack``, a second shared deployment on the same
database, whose channels the first one's relays would then also route to.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import Deployment, SharedStack, deploy


@pytest.fixture(scope="module")
def relay_env() -> dict[str, str]:
    """Extra ``RELAYGATE_*`` settings for the relay of the module's deployment (none by default)."""
    return {}


@pytest.fixture(scope="session")
def shared_stack(
    backing: BackingServices, shared_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedStack]:
    # Redis database 1: what the services keep there for the whole cluster (the performance board's
    # members) stays apart from the deployments of their own that run while this one is up.
    redis_url = backing.redis_url.rsplit("/", 1)[0] + "/1"
    logs = tmp_path_factory.mktemp("shared-stack-logs")
    with deploy(backing, shared_db, logs, service_env={"RELAYGATE_REDIS_URL": redis_url}) as running:
        yield SharedStack(running)


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest,
    backing: BackingServices,
    relay_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """The session's shared deployment for a ``shared_stack`` module, else one of the module's own."""
    if request.node.get_closest_marker("shared_stack") is not None:
        shared: SharedStack = request.getfixturevalue("shared_stack")
        with shared.module(relay_env) as running:
            yield running
        return
    migrated_db: DbUrls = request.getfixturevalue("migrated_db")
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("stack-logs"), relay_env=relay_env) as running:
        yield running
