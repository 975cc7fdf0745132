"""Updating and rotating keys, and admin tokens, through a real auth server."""

from __future__ import annotations

import asyncio
import time
from typing import TypedDict, Unpack

import jwt
import pytest
import sqlalchemy

from services.auth.models import User
from services.auth.tokens import ISSUER
from services.common.db import Database
from services.common.errors import AuthenticationError, InvalidRequest, NotFound, PermissionDenied
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.common.pb.relaygate.auth.v1.auth_pb2 import DenyReason
from services.common.pb.relaygate.common.v1.types_pb2 import Limits
from tests.auth.harness import TIMEOUT, TOKEN_SECRET, RunningAuth


class KeyChanges(TypedDict, total=False):
    """The key fields an UpdateKey can name in its mask."""

    user_id: str
    name: str
    allowed_models: list[str]
    allowed_cidrs: list[str]
    expires_at: int
    enabled: bool
    limits: Limits
    metadata: dict[str, str]


async def update(auth: RunningAuth, key_id: str, paths: list[str], **fields: Unpack[KeyChanges]) -> pb.ApiKey:
    request = pb.UpdateKeyRequest(key_id=key_id, key=pb.ApiKey(**fields))
    request.update_mask.paths.extend(paths)
    return await call(auth.stub.UpdateKey, request, timeout=TIMEOUT)


async def test_rotation_refuses_the_old_key_and_accepts_the_new(auth: RunningAuth) -> None:
    user = await auth.create_user("rotating")
    created = await auth.create_key(user.user_id, name="ci", limits=Limits(rpm=7))
    assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id

    rotated = await call(auth.stub.RotateKey, pb.RotateKeyRequest(key_id=created.key.key_id), timeout=TIMEOUT)

    assert rotated.api_key != created.api_key
    assert rotated.key.key_id == created.key.key_id
    old = await auth.verify(created.api_key)
    assert old.deny_reason == DenyReason.DENY_REASON_UNKNOWN
    new = await auth.verify(rotated.api_key)
    assert new.principal.key_id == created.key.key_id
    assert new.principal.key_limits.rpm == 7


async def test_update_changes_only_the_named_fields_and_drops_cached_principals(auth: RunningAuth) -> None:
    user = await auth.create_user("updating")
    created = await auth.create_key(user.user_id, name="before", allowed_models=["gpt-4o*"])
    assert (await auth.verify(created.api_key, model="gpt-4o-mini")).principal.key_id  # now cached

    updated = await update(
        auth,
        created.key.key_id,
        ["allowed_models", "limits"],
        allowed_models=["claude-*"],
        limits=Limits(tpm=1000),
    )

    assert updated.name == "before"
    assert list(updated.allowed_models) == ["claude-*"]
    denied = await auth.verify(created.api_key, model="gpt-4o-mini")
    assert denied.deny_reason == DenyReason.DENY_REASON_MODEL_NOT_ALLOWED
    allowed = await auth.verify(created.api_key, model="claude-3")
    assert allowed.principal.key_limits.tpm == 1000

    await update(auth, created.key.key_id, ["enabled"], enabled=False)
    assert (
        await auth.verify(created.api_key, model="claude-3")
    ).deny_reason == DenyReason.DENY_REASON_DISABLED
    await update(auth, created.key.key_id, ["enabled"], enabled=True)
    assert (await auth.verify(created.api_key, model="claude-3")).principal.key_id


async def test_update_refuses_unknown_fields_and_keys(auth: RunningAuth) -> None:
    user = await auth.create_user("strict")
    created = await auth.create_key(user.user_id)
    with pytest.raises(InvalidRequest) as caught:
        await update(auth, created.key.key_id, ["user_id"], user_id="usr_other")
    assert caught.value.param == "update_mask"
    with pytest.raises(InvalidRequest):
        await update(auth, created.key.key_id, [])
    with pytest.raises(NotFound):
        await update(auth, "key_missing", ["name"], name="x")
    with pytest.raises(InvalidRequest):
        await update(auth, created.key.key_id, ["allowed_cidrs"], allowed_cidrs=["nope"])


class TokenAsk(TypedDict, total=False):
    """What an IssueAdminToken asks for besides the key."""

    scopes: list[str]
    ttl_seconds: int
    client_ip: str


async def issue(auth: RunningAuth, api_key: str, **fields: Unpack[TokenAsk]) -> pb.AdminToken:
    request = pb.IssueAdminTokenRequest(api_key=api_key, **fields)
    return await call(auth.stub.IssueAdminToken, request, timeout=TIMEOUT)


async def verify_token(auth: RunningAuth, token: str, scope: str, client_ip: str = "") -> pb.AdminTokenClaims:
    request = pb.VerifyAdminTokenRequest(token=token, required_scope=scope, client_ip=client_ip)
    return await call(auth.stub.VerifyAdminToken, request, timeout=TIMEOUT)


def signed(payload: dict[str, object]) -> str:
    return jwt.encode(payload, TOKEN_SECRET, algorithm="HS256")


async def test_admin_tokens_carry_scopes_and_expire(auth: RunningAuth) -> None:
    admin = await auth.create_user("root", admin=True)
    admin_key = (await auth.create_key(admin.user_id)).api_key

    full = await issue(auth, admin_key)
    assert sorted(full.scopes) == ["admin:read", "admin:write"]
    assert full.expires_at > time.time()
    assert (await verify_token(auth, full.token, "admin:write")).user_id == admin.user_id

    read_only = await issue(auth, admin_key, scopes=["admin:read"], ttl_seconds=60)
    assert (await verify_token(auth, read_only.token, "admin:read")).scopes == ["admin:read"]
    with pytest.raises(PermissionDenied):
        await verify_token(auth, read_only.token, "admin:write")

    claims = jwt.decode(full.token, options={"verify_signature": False})
    expired = signed({**claims, "scope": "admin:read", "iat": 1, "exp": int(time.time()) - 1})
    with pytest.raises(AuthenticationError, match="expired"):
        await verify_token(auth, expired, "admin:read")
    # Signed with the right secret, but without the key it was issued for (the format before tokens
    # named their key): refused.
    keyless = signed(
        {"iss": ISSUER, "sub": admin.user_id, "scope": "admin:read", "iat": 1, "exp": int(time.time()) + 60}
    )
    with pytest.raises(AuthenticationError, match="not valid"):
        await verify_token(auth, keyless, "admin:read")
    forged = jwt.encode(
        {"iss": ISSUER, "sub": admin.user_id, "scope": "admin:write", "iat": 1, "exp": int(time.time()) + 60},
        "another-secret-of-the-same-length-0123456789",
        algorithm="HS256",
    )
    with pytest.raises(AuthenticationError, match="not valid"):
        await verify_token(auth, forged, "admin:write")
    with pytest.raises(InvalidRequest):
        await issue(auth, admin_key, scopes=["root"])


async def test_only_admin_keys_obtain_tokens(auth: RunningAuth) -> None:
    user = await auth.create_user("plain")
    plain_key = (await auth.create_key(user.user_id)).api_key
    with pytest.raises(PermissionDenied):
        await issue(auth, plain_key)
    with pytest.raises(AuthenticationError):
        await issue(auth, "rg-AAAAAAAAAAAA-" + "B" * 32)
    admin = await auth.create_user("revoked-admin", admin=True)
    created = await auth.create_key(admin.user_id)
    await auth.revoke(created.key.key_id)
    with pytest.raises(AuthenticationError):
        await issue(auth, created.api_key)


async def test_token_exchange_applies_the_keys_allowed_cidrs(auth: RunningAuth) -> None:
    admin = await auth.create_user("office-admin", admin=True)
    office_key = (await auth.create_key(admin.user_id, allowed_cidrs=["10.1.0.0/16"])).api_key

    with pytest.raises(PermissionDenied, match=r"203\.0\.113\.9"):
        await issue(auth, office_key, client_ip="203.0.113.9")
    # An unknown address cannot be inside the list (the relay always sends one).
    with pytest.raises(PermissionDenied):
        await issue(auth, office_key)
    token = (await issue(auth, office_key, client_ip="10.1.2.3")).token

    assert (await verify_token(auth, token, "admin:read", client_ip="10.1.9.9")).user_id == admin.user_id
    # The token carries the restriction with it: it is no use from outside the list either.
    with pytest.raises(PermissionDenied):
        await verify_token(auth, token, "admin:read", client_ip="198.51.100.1")


@pytest.mark.parametrize("change", ["revoke", "disable", "rotate", "expire", "narrow cidrs"])
async def test_changing_the_key_ends_its_tokens_at_once(auth: RunningAuth, change: str) -> None:
    admin = await auth.create_user(f"admin-{change}", admin=True)
    created = await auth.create_key(admin.user_id)
    key_id = created.key.key_id
    token = (await issue(auth, created.api_key, client_ip="10.0.0.1")).token
    assert (await verify_token(auth, token, "admin:write", client_ip="10.0.0.1")).key_id == key_id

    match change:
        case "revoke":
            await auth.revoke(key_id)
        case "disable":
            await update(auth, key_id, ["enabled"], enabled=False)
        case "rotate":
            await call(auth.stub.RotateKey, pb.RotateKeyRequest(key_id=key_id), timeout=TIMEOUT)
        case "expire":
            await update(auth, key_id, ["expires_at"], expires_at=int(time.time()) + 1)
            await asyncio.sleep(1.2)
        case "narrow cidrs":
            await update(auth, key_id, ["allowed_cidrs"], allowed_cidrs=["192.0.2.0/24"])

    with pytest.raises((AuthenticationError, PermissionDenied)):
        await verify_token(auth, token, "admin:write", client_ip="10.0.0.1")


async def test_a_token_of_another_users_key_is_refused(auth: RunningAuth) -> None:
    admin = await auth.create_user("real-admin", admin=True)
    created = await auth.create_key(admin.user_id)
    token = (await issue(auth, created.api_key)).token
    claims = jwt.decode(token, options={"verify_signature": False})
    other = await auth.create_user("someone-else", admin=True)
    # Even with the signing secret, a token must name the key's own user.
    with pytest.raises(AuthenticationError):
        await verify_token(auth, signed({**claims, "sub": other.user_id}), "admin:read")


async def test_a_user_losing_admin_loses_its_tokens(auth: RunningAuth, database: Database) -> None:
    admin = await auth.create_user("demoted", admin=True)
    token = (await issue(auth, (await auth.create_key(admin.user_id)).api_key)).token
    assert (await verify_token(auth, token, "admin:read")).user_id == admin.user_id
    async with database.transaction() as session:
        await session.execute(sqlalchemy.update(User).where(User.id == admin.user_id).values(admin=False))
    with pytest.raises(PermissionDenied, match="no longer an administrator"):
        await verify_token(auth, token, "admin:read")
