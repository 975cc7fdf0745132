"""The deployment the internal-security tests call: the four services as separate processes with the
session's certificates, on a fresh database of the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import Deployment, deploy


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices, migrated_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("security-stack")) as running:
        yield running
