"""Runs the auth service in-process, the way ``python -m services.auth`` does, plus the auth fixtures."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from devinfra.backing import BackingServices
from services.auth.app import run
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.common.db import Database
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceStub
from services.common.tls import AUTH
from tests.db_fixtures import DbUrls
from tests.in_process import in_process
from tests.tls import client as tls_client
from tests.tls import tls_dir

if TYPE_CHECKING:
    from services.common.pb.relaygate.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub

# Drawn per test run: no test depends on a secret anyone could read.
PEPPER = secrets.token_hex(32)
TOKEN_SECRET = secrets.token_hex(32)
TIMEOUT = 10.0


def auth_settings(urls: DbUrls, **overrides: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "database_url": urls.primary,
        "database_replica_urls": [urls.replica],
        "replica_check_interval_s": 0.2,
        "auth_listen": "127.0.0.1:0",
        "grpc_tls_dir": tls_dir("auth"),
        "key_pepper": PEPPER,
        "admin_token_secret": TOKEN_SECRET,
        "grpc_drain_seconds": 1.0,
    }
    values.update(overrides)
    return AuthSettings(**values)


@dataclass
class RunningAuth:
    settings: AuthSettings
    address: str
    stub: AuthServiceAsyncStub

    async def create_user(self, name: str = "someone", **fields: Any) -> pb.User:
        return await call(self.stub.CreateUser, pb.CreateUserRequest(name=name, **fields), timeout=TIMEOUT)

    async def create_key(self, user_id: str, **fields: Any) -> pb.CreateKeyResponse:
        request = pb.CreateKeyRequest(user_id=user_id, **fields)
        return await call(self.stub.CreateKey, request, timeout=TIMEOUT)

    async def verify(self, api_key: str, *, model: str = "", client_ip: str = "") -> pb.VerifyKeyResponse:
        request = pb.VerifyKeyRequest(api_key=api_key, model=model, client_ip=client_ip)
        return await call(self.stub.VerifyKey, request, timeout=TIMEOUT)

    async def revoke(self, key_id: str) -> pb.ApiKey:
        return await call(self.stub.RevokeKey, pb.RevokeKeyRequest(key_id=key_id), timeout=TIMEOUT)


@contextlib.asynccontextmanager
async def serving(settings: AuthSettings) -> AsyncIterator[RunningAuth]:
    """Run ``services.auth.app.run`` on a free port until the block exits, then stop it and wait."""
    async with in_process(run, settings) as port:
        address = f"127.0.0.1:{port}"
        client: grpc.aio.Channel = tls_client(address, AUTH)
        try:
            yield RunningAuth(settings, address, AuthServiceStub(client))
        finally:
            await client.close(grace=None)


@pytest.fixture(scope="module")
async def auth(migrated_db: DbUrls, backing: BackingServices) -> AsyncIterator[RunningAuth]:
    """An auth server for the module: real PostgreSQL primary + replica and Redis, on a free port."""
    async with serving(auth_settings(migrated_db, redis_url=backing.redis_url)) as running:
        yield running


@pytest.fixture
def store(database: Database) -> AuthStore:
    return AuthStore(database)
