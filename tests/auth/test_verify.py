"""VerifyKey and key creation through a real gRPC server on PostgreSQL (primary + replica) and Redis."""

from __future__ import annotations

import hmac

import pytest
from sqlalchemy import text, update

from devinfra.backing import BackingServices
from devinfra.postgres import psql
from services.auth import keys
from services.auth.models import ApiKey, User
from services.common.db import Database
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1 import auth_pb2 as pb
from services.common.pb.relaygate.common.v1.types_pb2 import Limits
from tests.auth.harness import PEPPER, TIMEOUT, RunningAuth
from tests.db_fixtures import DbUrls

DenyReason = pb.DenyReason


async def new_key(auth: RunningAuth, **fields: object) -> pb.CreateKeyResponse:
    user = await auth.create_user("verify-test")
    return await auth.create_key(user.user_id, **fields)


async def change_behind_auth(database: Database, key_id: str, **values: object) -> None:
    """Change a key's row directly on the primary, then wait for the replica to replay it (auth reads
    keys there, and waits the same way after its own key changes)."""
    async with database.transaction() as session:
        await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))
    lsn = await database.primary_lsn()
    assert lsn is None or await database.wait_replica_caught_up(lsn, timeout=10), "the replica did not replay"


def assert_denied(response: pb.VerifyKeyResponse, reason: int, *secrets: str) -> None:
    assert response.deny_reason == reason, DenyReason.Name(response.deny_reason)
    assert not response.HasField("principal")
    assert response.message
    for secret in secrets:
        assert secret not in response.message


async def test_created_key_is_shown_once_and_only_its_hash_is_stored(
    auth: RunningAuth, database: Database, backing: BackingServices
) -> None:
    created = await new_key(auth, name="ci")
    parsed = keys.parse(created.api_key)
    assert parsed is not None
    public_id, secret = parsed
    assert created.key.display_prefix == f"rg-{public_id[:6]}…"

    async with database.writer() as session:
        query = text("SELECT * FROM api_keys WHERE id = :id")
        row = (await session.execute(query, {"id": created.key.key_id})).mappings().one()
    assert hmac.compare_digest(bytes(row["secret_hash"]), keys.hash_secret(PEPPER, secret))
    for column, value in row.items():
        stored = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
        assert secret.encode() not in stored, column
        assert created.api_key.encode() not in stored, column

    backing.wait_for_replica()
    request = pb.ListKeysRequest(user_id=created.key.user_id)
    listed = await call(auth.stub.ListKeys, request, timeout=TIMEOUT)
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    assert listed.keys[0].display_prefix == created.key.display_prefix
    assert secret.encode() not in listed.SerializeToString()


async def test_valid_key_returns_principal_with_key_and_user_limits(auth: RunningAuth) -> None:
    user = await auth.create_user(
        "limited", email="limited@example.com", limits=Limits(rpm=600, max_concurrency=20)
    )
    created = await auth.create_key(
        user.user_id,
        name="batch jobs",
        allowed_models=["gpt-4o*"],
        limits=Limits(rpm=60, tpm=10_000, max_concurrency=4),
        metadata={"team": "search"},
    )

    response = await auth.verify(created.api_key, model="gpt-4o-mini", client_ip="10.1.2.3")

    assert response.deny_reason == DenyReason.DENY_REASON_UNSPECIFIED
    assert response.message == ""
    principal = response.principal
    assert principal.key_id == created.key.key_id
    assert principal.user_id == user.user_id
    assert principal.key_name == "batch jobs"
    assert list(principal.allowed_models) == ["gpt-4o*"]
    assert principal.key_limits == Limits(rpm=60, tpm=10_000, max_concurrency=4)
    assert principal.user_limits == Limits(rpm=600, max_concurrency=20)
    assert dict(principal.metadata) == {"team": "search"}
    assert not principal.admin


async def test_limits_stored_with_budgets_by_an_earlier_version_still_load(
    auth: RunningAuth, database: Database, backing: BackingServices
) -> None:
    """Budgets are quota's now; a row written before (or not yet migrated) still verifies and lists,
    showing its rate limits only."""
    user = await auth.create_user("legacy")
    created = await auth.create_key(user.user_id, name="legacy")
    legacy = {"rpm": 30, "daily_budget_micros": 5_000_000, "monthly_budget_micros": 90_000_000}
    async with database.transaction() as session:
        await session.execute(update(ApiKey).where(ApiKey.id == created.key.key_id).values(limits=legacy))
        await session.execute(
            update(User)
            .where(User.id == user.user_id)
            .values(limits={"tpm": 700, "daily_budget_micros": 1000})
        )

    principal = (await auth.verify(created.api_key)).principal
    assert (principal.key_limits, principal.user_limits) == (Limits(rpm=30), Limits(tpm=700))
    backing.wait_for_replica()
    listed = await call(auth.stub.ListKeys, pb.ListKeysRequest(user_id=user.user_id), timeout=TIMEOUT)
    assert [k.limits for k in listed.keys] == [Limits(rpm=30)]
    request = pb.UpdateKeyRequest(key_id=created.key.key_id, key=pb.ApiKey(name="renamed"))
    request.update_mask.paths.append("name")
    renamed = await call(auth.stub.UpdateKey, request, timeout=TIMEOUT)
    assert (renamed.name, renamed.limits) == ("renamed", Limits(rpm=30))


async def test_admin_flag_comes_from_the_user(auth: RunningAuth) -> None:
    admin = await auth.create_user("ops", admin=True)
    created = await auth.create_key(admin.user_id)
    assert (await auth.verify(created.api_key)).principal.admin


@pytest.mark.parametrize(
    "api_key",
    [
        pytest.param("", id="empty"),
        pytest.param("sk-proj-abcdef", id="openai-style"),
        pytest.param("rg-short-key", id="short"),
        pytest.param("rg-" + "A" * 100_000, id="huge"),
    ],
)
async def test_malformed_key(auth: RunningAuth, api_key: str) -> None:
    response = await auth.verify(api_key)
    assert_denied(response, DenyReason.DENY_REASON_MALFORMED)
    if api_key:
        assert api_key not in response.message


async def test_unknown_public_id(auth: RunningAuth) -> None:
    plaintext, _, secret = keys.generate()
    assert_denied(await auth.verify(plaintext), DenyReason.DENY_REASON_UNKNOWN, plaintext, secret)


async def test_wrong_secret(auth: RunningAuth) -> None:
    created = await new_key(auth)
    public_id, _ = keys.parse(created.api_key) or ("", "")
    _, _, other_secret = keys.generate()
    forged = f"rg-{public_id}-{other_secret}"

    assert_denied(await auth.verify(forged), DenyReason.DENY_REASON_UNKNOWN, forged, other_secret)
    # The right key still works afterwards: the failure did not poison the cache.
    assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id


async def test_revoked_key_is_refused_at_once_even_after_being_cached(auth: RunningAuth) -> None:
    created = await new_key(auth)
    for _ in range(2):  # the second answer comes from the cache
        assert (await auth.verify(created.api_key)).principal.key_id == created.key.key_id

    revoked = await auth.revoke(created.key.key_id)

    assert revoked.revoked
    assert revoked.enabled
    assert_denied(await auth.verify(created.api_key), DenyReason.DENY_REASON_REVOKED, created.api_key)
    again = await auth.revoke(created.key.key_id)
    assert again.revoked


async def test_expired_key(auth: RunningAuth, database: Database) -> None:
    created = await new_key(auth)
    await change_behind_auth(database, created.key.key_id, expires_at=1000)

    assert_denied(await auth.verify(created.api_key), DenyReason.DENY_REASON_EXPIRED, created.api_key)


async def test_disabled_key(auth: RunningAuth, database: Database) -> None:
    created = await new_key(auth)
    await change_behind_auth(database, created.key.key_id, enabled=False)

    assert_denied(await auth.verify(created.api_key), DenyReason.DENY_REASON_DISABLED, created.api_key)


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        pytest.param("gpt-4o", True, id="pattern-prefix-itself"),
        pytest.param("gpt-4o-mini", True, id="pattern"),
        pytest.param("claude-3", True, id="exact"),
        pytest.param("gpt-4", False, id="shorter-than-pattern"),
        pytest.param("claude-3-opus", False, id="exact-is-not-a-prefix"),
        pytest.param("GPT-4o", False, id="case-sensitive"),
        pytest.param("", True, id="no-model-given"),
    ],
)
async def test_model_scope(auth: RunningAuth, model: str, allowed: bool) -> None:
    created = await new_key(auth, allowed_models=["gpt-4o*", "claude-3"])
    response = await auth.verify(created.api_key, model=model)
    if allowed:
        assert response.principal.key_id == created.key.key_id
    else:
        assert_denied(response, DenyReason.DENY_REASON_MODEL_NOT_ALLOWED, created.api_key)


@pytest.mark.parametrize(
    ("client_ip", "allowed"),
    [
        pytest.param("10.1.2.3", True, id="in-cidr"),
        pytest.param("11.0.0.1", False, id="outside-cidr"),
        pytest.param("192.168.1.7", True, id="single-address"),
        pytest.param("192.168.1.8", False, id="next-address"),
        pytest.param("2001:db8::1", True, id="ipv6-cidr"),
        pytest.param("2001:db9::1", False, id="ipv6-outside"),
        pytest.param("not-an-ip", False, id="unparsable"),
        pytest.param("", True, id="no-address-given"),
    ],
)
async def test_ip_scope(auth: RunningAuth, client_ip: str, allowed: bool) -> None:
    created = await new_key(auth, allowed_cidrs=["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"])
    response = await auth.verify(created.api_key, client_ip=client_ip)
    if allowed:
        assert response.principal.key_id == created.key.key_id
    else:
        assert_denied(response, DenyReason.DENY_REASON_IP_NOT_ALLOWED, created.api_key)


async def test_key_works_immediately_while_the_replica_is_behind(
    auth: RunningAuth, backing: BackingServices, migrated_db: DbUrls
) -> None:
    user = await auth.create_user("read-your-writes")
    backing.pause_replica_replay()
    try:
        created = await auth.create_key(user.user_id)
        replica_rows = psql(
            migrated_db.replica, f"SELECT count(*) FROM api_keys WHERE id = '{created.key.key_id}'"
        )
        assert replica_rows == "0"  # the replica really has not seen it

        response = await auth.verify(created.api_key)
    finally:
        backing.resume_replica_replay()

    assert response.principal.key_id == created.key.key_id
