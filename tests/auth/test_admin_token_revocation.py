"""Ending one admin token (signing out) and searching users and keys, through a real auth server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest
import sqlalchemy

from services.auth.keys import KeyScope
from services.auth.models import AdminTokenRevocation
from services.auth.store import AuthStore
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.common.errors import AuthenticationError
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.migrations import upgrade
from tests.auth.harness import TIMEOUT, TOKEN_SECRET, RunningAuth


async def _issue(auth: RunningAuth, api_key: str) -> str:
    request = pb.IssueAdminTokenRequest(api_key=api_key)
    return str((await call(auth.stub.IssueAdminToken, request, timeout=TIMEOUT)).token)


async def _verify(auth: RunningAuth, token: str) -> pb.AdminTokenClaims:
    request = pb.VerifyAdminTokenRequest(token=token, required_scope="admin:read")
    return await call(auth.stub.VerifyAdminToken, request, timeout=TIMEOUT)


async def _revoke(auth: RunningAuth, token: str) -> pb.RevokeAdminTokenResponse:
    request = pb.RevokeAdminTokenRequest(token=token)
    return await call(auth.stub.RevokeAdminToken, request, timeout=TIMEOUT)


async def test_a_revoked_token_is_refused_and_the_keys_other_tokens_are_not(auth: RunningAuth) -> None:
    admin = await auth.create_user("signing-out", admin=True)
    api_key = (await auth.create_key(admin.user_id)).api_key
    ending, staying = await _issue(auth, api_key), await _issue(auth, api_key)
    assert (await _verify(auth, ending)).user_id == admin.user_id

    answer = await _revoke(auth, ending)

    assert answer.revoked and answer.expires_at > time.time()
    with pytest.raises(AuthenticationError, match="signed out"):
        await _verify(auth, ending)
    # The key and its other sessions go on.
    assert (await _verify(auth, staying)).user_id == admin.user_id
    assert (await _issue(auth, api_key)) != ending
    assert (await _revoke(auth, ending)).revoked  # again: harmless


async def test_nothing_to_end_for_a_token_that_is_not_valid(auth: RunningAuth, database: Database) -> None:
    assert not (await _revoke(auth, "not-a-token")).revoked
    forged = jwt.encode({"jti": "tok_forged", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    assert not (await _revoke(auth, forged)).revoked
    async with database.reader(consistent=True) as session:
        stored = (await session.scalars(sqlalchemy.select(AdminTokenRevocation.token_id))).all()
    assert "tok_forged" not in stored


async def test_revocations_are_kept_only_until_their_token_expires(
    auth: RunningAuth, database: Database
) -> None:
    admin = await auth.create_user("short-lived", admin=True)
    api_key = (await auth.create_key(admin.user_id)).api_key
    claims = jwt.decode(await _issue(auth, api_key), options={"verify_signature": False})
    soon = {**claims, "jti": "tok_soon", "exp": int(time.time()) + 1}
    assert (await _revoke(auth, jwt.encode(soon, TOKEN_SECRET, algorithm="HS256"))).revoked
    await asyncio.sleep(2.1)
    # The next sign-out clears the revocations of tokens that have expired since.
    assert (await _revoke(auth, await _issue(auth, api_key))).revoked
    async with database.reader(consistent=True) as session:
        stored = (await session.scalars(sqlalchemy.select(AdminTokenRevocation.token_id))).all()
    assert "tok_soon" not in stored and len(stored) >= 1


async def test_users_and_keys_are_searched_on_the_server(auth: RunningAuth) -> None:
    marker = f"srch{int(time.time() * 1000) % 10**8}"
    carol = await auth.create_user(f"Carol {marker}", email=f"carol-{marker}@example.com")
    dave = await auth.create_user(f"dave_{marker}")
    await auth.create_user("100%_literal")
    laptop = await auth.create_key(carol.user_id, name=f"Laptop {marker}")
    await auth.create_key(dave.user_id, name="ci")

    async def users(query: str) -> list[str]:
        request = pb.ListUsersRequest(limit=1000, query=query)
        return [u.name for u in (await call(auth.stub.ListUsers, request, timeout=TIMEOUT)).users]

    async def keys(query: str, **fields: str) -> list[str]:
        request = pb.ListKeysRequest(limit=1000, query=query, **fields)
        return [k.key_id for k in (await call(auth.stub.ListKeys, request, timeout=TIMEOUT)).keys]

    assert await users(marker.upper()) == [f"Carol {marker}", f"dave_{marker}"]
    assert await users(f"CAROL-{marker}@") == [f"Carol {marker}"]
    assert await users(carol.user_id) == [f"Carol {marker}"]
    # LIKE's wildcards are plain characters in a search.
    assert await users("0%_l") == ["100%_literal"]
    assert await users("%") == ["100%_literal"]
    assert await keys(f"laptop {marker}") == [laptop.key.key_id]
    assert await keys(laptop.key.display_prefix.rstrip(".…")) == [laptop.key.key_id]
    assert await keys(carol.user_id) == [laptop.key.key_id]
    assert await keys("ci", user_id=carol.user_id) == []


async def test_revocations_and_search_on_sqlite(tmp_path: Path) -> None:
    """The embedded default: the same table and queries on SQLite."""
    url = f"sqlite:///{tmp_path / 'relaygate.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        store = AuthStore(db)
        now = int(time.time())
        user = await store.create_user(name="Local_Admin", email="", admin=True, limits={}, now=now)
        key = await store.create_key(
            user_id=user.id,
            public_id="AbCdEfGh1234",
            secret_hash=b"x" * 32,
            scope=KeyScope(name="laptop"),
            now=now,
        )
        assert [u.id for u in await store.list_users(query="local_")] == [user.id]
        assert await store.list_users(query="local%") == []
        assert [k.id for k in await store.list_keys(query="rg-AbCd")] == [key.id]
        assert await store.admin_token_state(key.id, token_id="tok_a") is not None
        assert not (await store.admin_token_state(key.id, token_id="tok_a") or (None, True))[1]
        await store.revoke_admin_token("tok_a", expires_at=now + 60, now=now)
        await store.revoke_admin_token("tok_a", expires_at=now + 60, now=now)
        assert (await store.admin_token_state(key.id, token_id="tok_a") or (None, False))[1]
        assert not (await store.admin_token_state(key.id, token_id="tok_b") or (None, True))[1]
        # Once it would have expired, the next revocation clears it.
        await store.revoke_admin_token("tok_b", expires_at=now + 120, now=now + 61)
        assert not (await store.admin_token_state(key.id, token_id="tok_a") or (None, True))[1]
    finally:
        await db.close()
