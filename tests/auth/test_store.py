"""AuthStore on the real primary and replica: read routing, pagination, revocation, last-used batching."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select

from devinfra.backing import BackingServices
from devinfra.postgres import psql
from services.auth import keys
from services.auth.models import ApiKey
from services.auth.store import AuthStore, KeyRecord
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.common.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from tests.db_fixtures import DbUrls

NOW = 1_800_000_000


async def make_key(store: AuthStore, user_id: str, scope: keys.KeyScope | None = None) -> KeyRecord:
    _, public_id, secret = keys.generate()
    return await store.create_key(
        user_id=user_id,
        public_id=public_id,
        secret_hash=keys.hash_secret("pepper", secret),
        scope=scope or keys.KeyScope(),
        now=NOW,
    )


async def test_key_for_unknown_user_is_not_found(store: AuthStore) -> None:
    with pytest.raises(NotFound) as caught:
        await make_key(store, "usr_missing")
    assert caught.value.param == "user_id"


async def test_invalid_scope_is_refused_before_any_write(store: AuthStore) -> None:
    user = await store.create_user(name="scoped", email="", admin=False, limits={}, now=NOW)
    with pytest.raises(InvalidRequest):
        await make_key(store, user.id, keys.KeyScope(allowed_cidrs=("nonsense",)))
    assert await store.list_keys(user_id=user.id) == []


async def test_duplicate_email_is_a_conflict_but_empty_emails_are_not(store: AuthStore) -> None:
    await store.create_user(name="a", email="dup@example.com", admin=False, limits={}, now=NOW)
    with pytest.raises(Conflict):
        await store.create_user(name="b", email="dup@example.com", admin=False, limits={}, now=NOW)
    first = await store.create_user(name="c", email="", admin=False, limits={}, now=NOW)
    second = await store.create_user(name="d", email="", admin=False, limits={}, now=NOW)
    assert first.email == second.email == ""
    with pytest.raises(InvalidRequest):
        await store.create_user(name="  ", email="", admin=False, limits={}, now=NOW)


async def test_found_on_the_primary_when_the_replica_has_not_replayed_it(
    store: AuthStore, database: Database, backing: BackingServices, migrated_db: DbUrls
) -> None:
    assert any(replica.healthy for replica in database.replicas)
    user = await store.create_user(name="fresh", email="", admin=False, limits={}, now=NOW)
    backing.pause_replica_replay()
    try:
        key = await make_key(store, user.id)
        assert psql(migrated_db.replica, f"SELECT count(*) FROM api_keys WHERE id = '{key.id}'") == "0"

        found = await store.find_credential(key.public_id)
    finally:
        backing.resume_replica_replay()
    assert found is not None
    assert found.key == key
    assert found.user == user
    assert await store.find_credential("NoSuchKey123") is None


async def test_lists_page_by_id_without_gaps_or_repeats(store: AuthStore, backing: BackingServices) -> None:
    owner = await store.create_user(name="owner", email="", admin=False, limits={}, now=NOW)
    created = [(await make_key(store, owner.id)).id for _ in range(5)]
    backing.wait_for_replica()

    seen: list[str] = []
    after = ""
    while page := await store.list_keys(user_id=owner.id, limit=2, after_id=after):
        assert len(page) <= 2
        seen += [key.id for key in page]
        after = page[-1].id
    assert seen == sorted(created)

    users = await store.list_users(limit=1000)
    assert owner.id in [user.id for user in users]
    assert [user.id for user in users] == sorted(user.id for user in users)


async def test_revoke_is_idempotent_and_keeps_enabled(store: AuthStore) -> None:
    user = await store.create_user(name="revoker", email="", admin=False, limits={}, now=NOW)
    key = await make_key(store, user.id)

    first = await store.revoke_key(key.id, now=NOW + 10)
    second = await store.revoke_key(key.id, now=NOW + 20)

    assert first.revoked and first.enabled
    assert first.revoked_at == second.revoked_at == NOW + 10
    with pytest.raises(NotFound):
        await store.revoke_key("key_missing", now=NOW)


async def test_last_used_is_written_in_one_statement_and_never_rewinds(
    store: AuthStore, database: Database
) -> None:
    user = await store.create_user(name="busy", email="", admin=False, limits={}, now=NOW)
    first, second = await make_key(store, user.id), await make_key(store, user.id)
    for at in (NOW + 5, NOW + 9, NOW + 7):
        store.touch_last_used(first.id, at)
    store.touch_last_used(second.id, NOW + 3)

    statements: list[tuple[str, bool]] = []

    def record(*args: object) -> None:
        # before_cursor_execute(conn, cursor, statement, parameters, context, executemany)
        statements.append((str(args[2]), bool(args[5])))

    event.listen(database.primary.sync_engine, "before_cursor_execute", record)
    try:
        assert await store.flush_last_used() == 2
    finally:
        event.remove(database.primary.sync_engine, "before_cursor_execute", record)
    updates = [(s, many) for s, many in statements if s.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1
    assert updates[0][1]  # executemany: one statement for the whole batch

    store.touch_last_used(first.id, NOW + 1)  # older than what is stored
    assert await store.flush_last_used() == 1
    assert await store.flush_last_used() == 0

    async with database.writer() as session:
        rows = (await session.execute(select(ApiKey.id, ApiKey.last_used_at))).all()
    stored = dict(rows)
    assert stored[first.id] == NOW + 9
    assert stored[second.id] == NOW + 3


async def test_unreachable_database_is_service_unavailable() -> None:
    db = Database(DatabaseSettings(database_url="postgresql://postgres@127.0.0.1:9/nowhere"))
    try:
        with pytest.raises(ServiceUnavailable):
            await AuthStore(db).find_credential("AbCdEf012345")
    finally:
        await db.close()
