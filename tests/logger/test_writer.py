"""writer: every event field stored, idempotent batches, one transaction, on PostgreSQL and SQLite."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import sqlalchemy.exc
from sqlalchemy import select

from services.common.clock import ManualClock
from services.common.config import DatabaseSettings
from services.common.db import Database
from services.logger.models import RequestLog
from services.logger.query import LogQuery, list_request_logs
from services.logger.writer import SCALAR_FIELDS, check_storable, to_event, write
from services.migrations import upgrade
from tests.logger.factories import count_rows, eventually, make_event, stored_ids, unique


def test_every_event_field_has_a_column() -> None:
    columns = set(RequestLog.__table__.columns.keys())
    assert set(SCALAR_FIELDS) <= columns
    usage_columns = {
        "prompt_tokens",
        "completion_tokens",
        "cached_prompt_tokens",
        "images",
        "cache_write_tokens",
        "reasoning_tokens",
        "usage_estimated",
    }
    assert columns == set(SCALAR_FIELDS) | usage_columns | {"logged_at_ms"}


async def test_rows_hold_the_whole_event_and_are_readable_on_the_replica(database: Database) -> None:
    run_id = unique("w")
    events = [make_event(run_id, i) for i in range(20)]
    clock = ManualClock(now=1_800_000_000.5)

    assert await write(database, events, clock=clock) == 20

    async def on_replica() -> bool:
        return len(await stored_ids(database, run_id, replica=True)) == 20

    await eventually(on_replica, timeout=2.0, what="rows on the replica")
    async with database.reader() as session:
        rows = (
            await session.scalars(
                select(RequestLog).where(RequestLog.event_id.in_([e.event_id for e in events]))
            )
        ).all()
    by_id = {row.event_id: row for row in rows}
    for event in events:
        row = by_id[event.event_id]
        assert to_event(row) == event
        assert row.logged_at_ms == 1_800_000_000_500


async def test_writing_again_is_a_no_op(database: Database) -> None:
    run_id = unique("w")
    events = [make_event(run_id, i) for i in range(50)]
    assert await write(database, events) == 50
    # Redelivered after a lost commit: nothing new, nothing changed.
    changed = [make_event(run_id, i, cost_micros=999_999) for i in range(50)]
    assert await write(database, changed) == 0
    # Half old, half new, and one event twice in the same batch.
    mixed = [make_event(run_id, i) for i in range(25, 75)] + [make_event(run_id, 60)]
    assert await write(database, mixed) == 25
    assert sorted(await stored_ids(database, run_id)) == sorted(e.event_id for e in events + mixed[25:50])
    async with database.reader(consistent=True) as session:
        costs = set(
            await session.scalars(
                select(RequestLog.cost_micros).where(RequestLog.event_id.like(f"{run_id}%"))
            )
        )
    assert 999_999 not in costs


async def test_a_failing_batch_stores_nothing(database: Database) -> None:
    run_id = unique("w")
    events = [make_event(run_id, i) for i in range(10)]
    # The last row cannot be stored: the whole transaction must roll back.
    events.append(make_event(run_id, 10, key_id="k" * 41))
    # PostgreSQL rows travel by COPY, straight through the driver, hence its own error class.
    with pytest.raises((sqlalchemy.exc.DBAPIError, asyncpg.PostgresError), match="value too long"):
        await write(database, events)
    assert await count_rows(database, run_id) == 0


async def test_empty_batch_writes_nothing(database: Database) -> None:
    assert await write(database, []) == 0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"key_id": "k" * 41}, "key_id has 41 characters", id="too long"),
        pytest.param({"event_id": "e" * 65}, "event_id has 65 characters", id="event id too long"),
        pytest.param({"model": "gpt\x00"}, "model contains a NUL", id="NUL"),
        pytest.param({"occurred_at_ms": 0}, "without occurred_at_ms", id="no time"),
        pytest.param({"occurred_at_ms": -5}, "without occurred_at_ms", id="negative time"),
    ],
)
def test_unstorable_events_are_refused(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_storable(make_event("c", 1, **fields))


def test_storable_event_passes() -> None:
    check_storable(make_event("c", 1, key_id="k" * 40, model="m" * 200))


async def test_sqlite_write_and_list(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'logger.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        assert db.dialect == "sqlite"
        # Enough rows for several statements under SQLite's limit on bound parameters.
        events = [make_event("s", i) for i in range(3000)]
        assert await write(db, events) == 3000
        assert await write(db, [*events[10:], make_event("s", 3000)]) == 1
        assert len(await stored_ids(db, "s")) == 3001
        async with db.reader() as session:
            row = await session.scalar(select(RequestLog).where(RequestLog.event_id == events[3].event_id))
        assert row is not None
        assert to_event(row) == events[3]
        listed: list[str] = []
        cursor = ""
        while True:
            page = await list_request_logs(db, LogQuery(limit=1000, cursor=cursor))
            listed.extend(row.event_id for row in page.rows)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        assert listed == [f"s_{i:06d}" for i in reversed(range(3001))]
    finally:
        await db.close()
