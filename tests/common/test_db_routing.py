"""Reads go to the replica, writes and consistent reads to the primary, and a dead replica is skipped."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from devinfra.backing import BackingServices
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.migrations import upgrade
from tests.db_fixtures import DbUrls


async def in_recovery(db: Database, *, consistent: bool = False) -> bool:
    async with db.reader(consistent=consistent) as session:
        return bool(await session.scalar(text("SELECT pg_is_in_recovery()")))


async def test_reader_uses_replica_and_consistent_reader_the_primary(database: Database) -> None:
    replicas = database.routing_status()["replicas"]
    assert isinstance(replicas, list)
    assert replicas[0]["healthy"] is True
    assert await in_recovery(database) is True
    assert await in_recovery(database, consistent=True) is False
    async with database.writer() as session:
        assert not await session.scalar(text("SELECT pg_is_in_recovery()"))


def replica_healthy(db: Database) -> bool:
    # Read through a call: an attribute read inline stays narrowed by the earlier assert, and
    # check_replicas (which updates it) is invisible to the type checker.
    return db.replicas[0].healthy


async def test_replica_down_falls_back_to_primary(backing: BackingServices, migrated_db: DbUrls) -> None:
    db = Database(migrated_db.settings())
    await db.start()
    try:
        backing.stop_replica()
        await db.check_replicas()
        assert replica_healthy(db) is False
        assert await in_recovery(db) is False
        backing.start_replica()
        backing.wait_for_replica()
        await db.check_replicas()
        assert replica_healthy(db) is True
        assert await in_recovery(db) is True
    finally:
        await db.close()


async def test_lsn_wait_sees_own_write(database: Database) -> None:
    async with database.transaction() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS lsn_probe (v int)"))
        await session.execute(text("INSERT INTO lsn_probe VALUES (42)"))
    lsn = await database.primary_lsn()
    assert lsn is not None
    assert await database.wait_replica_caught_up(lsn, timeout=5)
    async with database.reader() as session:
        assert await session.scalar(text("SELECT count(*) FROM lsn_probe WHERE v = 42")) == 1


async def test_sqlite_migrates_and_routes_to_one_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        async with db.transaction() as session:
            await session.execute(
                text(
                    "INSERT INTO accounts (user_id, balance_micros, reserved_micros, updated_at)"
                    " VALUES ('u', 5, 0, 0)"
                )
            )
        async with db.reader() as session:
            assert await session.scalar(text("SELECT balance_micros FROM accounts WHERE user_id = 'u'")) == 5
        async with db.reader() as session:
            assert await session.scalar(text("PRAGMA journal_mode")) == "wal"
    finally:
        await db.close()
