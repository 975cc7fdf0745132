"""The bootstrap admin key: idempotent across restarts and across replicas starting at once."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from sqlalchemy import func, select

from services.auth import keys
from services.auth.bootstrap import BootstrapError, Outcome, admin_user_id, ensure_admin_key
from services.auth.models import ApiKey, User
from services.auth.store import AuthStore
from services.common.db import Database
from tests.db_fixtures import DbUrls

PEPPER = secrets.token_hex(32)
ADMIN_USER_ID = admin_user_id(PEPPER)
NOW = 1_800_000_000


async def count_rows(database: Database, public_id: str) -> tuple[int, int]:
    async with database.writer() as session:
        admins = await session.scalar(select(func.count()).select_from(User).where(User.id == ADMIN_USER_ID))
        key_rows = await session.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.public_id == public_id)
        )
    return int(admins or 0), int(key_rows or 0)


async def test_running_twice_creates_one_admin_and_one_key(store: AuthStore, database: Database) -> None:
    plaintext, public_id, secret = keys.generate()

    first = await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER, now=NOW)
    second = await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER, now=NOW + 60)

    assert (first, second) == (Outcome.CREATED, Outcome.EXISTS)
    assert await count_rows(database, public_id) == (1, 1)
    credential = await store.find_credential(public_id, consistent=True)
    assert credential is not None
    assert credential.user.admin and credential.user.name == "admin"
    assert keys.verify_secret(PEPPER, secret, credential.key.secret_hash)


async def test_replicas_starting_at_once_agree(migrated_db: DbUrls, database: Database) -> None:
    plaintext, public_id, _ = keys.generate()
    # One Database per "replica": separate pools, so the inserts really race on the server.
    databases = [Database(migrated_db.settings()) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(
            *(ensure_admin_key(AuthStore(db), api_key=plaintext, pepper=PEPPER, now=NOW) for db in databases)
        )
    finally:
        for db in databases:
            await db.close()

    assert sorted(outcomes) == sorted([Outcome.CREATED] + [Outcome.EXISTS] * 3)
    assert await count_rows(database, public_id) == (1, 1)


async def test_a_new_bootstrap_key_joins_the_same_admin(store: AuthStore, database: Database) -> None:
    old, old_public_id, _ = keys.generate()
    new, new_public_id, _ = keys.generate()
    await ensure_admin_key(store, api_key=old, pepper=PEPPER, now=NOW)

    assert await ensure_admin_key(store, api_key=new, pepper=PEPPER, now=NOW) in (Outcome.CREATED,)

    old_credential = await store.find_credential(old_public_id, consistent=True)
    new_credential = await store.find_credential(new_public_id, consistent=True)
    assert old_credential is not None and new_credential is not None
    assert old_credential.user.id == new_credential.user.id == ADMIN_USER_ID


async def test_a_revoked_bootstrap_key_stays_revoked(store: AuthStore) -> None:
    plaintext, public_id, _ = keys.generate()
    await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER, now=NOW)
    credential = await store.find_credential(public_id, consistent=True)
    assert credential is not None
    await store.revoke_key(credential.key.id, now=NOW + 1)

    assert await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER, now=NOW + 2) is Outcome.REVOKED
    again = await store.find_credential(public_id, consistent=True)
    assert again is not None and again.key.revoked


async def test_conflicting_secret_or_changed_pepper_refuses_to_start(
    store: AuthStore, caplog: pytest.LogCaptureFixture
) -> None:
    plaintext, public_id, _ = keys.generate()
    await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER, now=NOW)
    _, _, other_secret = keys.generate()
    impostor = f"rg-{public_id}-{other_secret}"

    with pytest.raises(BootstrapError) as caught:
        await ensure_admin_key(store, api_key=impostor, pepper=PEPPER, now=NOW)
    assert other_secret not in str(caught.value)
    with pytest.raises(BootstrapError):
        await ensure_admin_key(store, api_key=plaintext, pepper=PEPPER + "-rotated", now=NOW)
    with pytest.raises(BootstrapError):
        await ensure_admin_key(store, api_key="rg-nope", pepper=PEPPER, now=NOW)
    for record in caplog.records:
        assert plaintext not in record.getMessage()
        assert other_secret not in record.getMessage()
