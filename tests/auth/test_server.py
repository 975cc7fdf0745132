"""The auth process end to end: ``run()`` on a free port, a real gRPC client, errors as their classes."""

from __future__ import annotations

import pytest

from devinfra.backing import BackingServices
from services.auth import keys
from services.auth.bootstrap import admin_user_id
from services.common.errors import Conflict, InvalidRequest, NotFound
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from tests.auth.harness import PEPPER, TIMEOUT, RunningAuth, auth_settings, serving
from tests.db_fixtures import DbUrls


async def test_create_key_for_unknown_user_arrives_as_not_found(auth: RunningAuth) -> None:
    with pytest.raises(NotFound) as caught:
        await auth.create_key("usr_does_not_exist")
    assert caught.value.param == "user_id"
    assert "usr_does_not_exist" in caught.value.message


async def test_other_errors_keep_their_class_across_the_wire(auth: RunningAuth) -> None:
    with pytest.raises(NotFound):
        await auth.revoke("key_does_not_exist")
    await auth.create_user("first", email="same@example.com")
    with pytest.raises(Conflict):
        await auth.create_user("second", email="same@example.com")
    user = await auth.create_user("scoped")
    with pytest.raises(InvalidRequest) as caught:
        await auth.create_key(user.user_id, allowed_cidrs=["not-a-network"])
    assert caught.value.param == "allowed_cidrs"


async def test_admin_flow_create_list_verify_revoke(auth: RunningAuth, backing: BackingServices) -> None:
    user = await auth.create_user("flow", email="flow@example.com")
    created = await auth.create_key(user.user_id, name="laptop")
    assert (await auth.verify(created.api_key)).principal.user_id == user.user_id

    backing.wait_for_replica()
    users = await call(auth.stub.ListUsers, pb.ListUsersRequest(limit=1000), timeout=TIMEOUT)
    assert user.user_id in [u.user_id for u in users.users]
    listed = await call(auth.stub.ListKeys, pb.ListKeysRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert [k.name for k in listed.keys] == ["laptop"]
    assert not listed.keys[0].revoked

    await auth.revoke(created.key.key_id)
    denied = await auth.verify(created.api_key)
    assert denied.deny_reason == pb.DenyReason.DENY_REASON_REVOKED


async def test_bootstrap_key_through_restarts(migrated_db: DbUrls, backing: BackingServices) -> None:
    plaintext, _, _ = keys.generate()
    settings = auth_settings(migrated_db, redis_url="", bootstrap_admin_key=plaintext)
    for _ in range(2):  # the second start finds the key already there
        async with serving(settings) as running:
            response = await running.verify(plaintext)
            assert response.principal.admin
            assert response.principal.user_id == admin_user_id(PEPPER)
    backing.wait_for_replica()
    async with serving(settings) as running:
        listed = await call(
            running.stub.ListKeys, pb.ListKeysRequest(user_id=admin_user_id(PEPPER)), timeout=TIMEOUT
        )
    assert len([k for k in listed.keys if k.display_prefix == keys.display_prefix(plaintext[3:15])]) == 1


async def test_last_use_is_written_on_shutdown(migrated_db: DbUrls, backing: BackingServices) -> None:
    settings = auth_settings(migrated_db, redis_url="", last_used_flush_s=3600)
    async with serving(settings) as running:
        user = await running.create_user("shutdown")
        created = await running.create_key(user.user_id)
        assert (await running.verify(created.api_key)).principal.key_id == created.key.key_id
    backing.wait_for_replica()
    async with serving(settings) as running:
        listed = await call(running.stub.ListKeys, pb.ListKeysRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert listed.keys[0].last_used_at >= created.key.created_at > 0
