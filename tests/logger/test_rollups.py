"""Hourly usage rollups, written in the batch's transaction: counted once per stored row however often an
event is redelivered, deadlock-free when two loggers write overlapping batches, on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from services.common.config import DatabaseSettings
from services.common.db import Database
from services.logger.writer import COLUMNS, rollups, to_row, write
from services.migrations import upgrade
from tests.logger.factories import (
    HOUR_MS,
    assert_landed_exactly_once,
    burst_event,
    expected_rollups,
    make_event,
    stored_rollups,
    unique,
)


def test_rollups_sum_each_hour_key_user_and_model_in_key_order() -> None:
    hour = 1_900_000_000_000 - 1_900_000_000_000 % HOUR_MS
    events = [
        make_event("r", 1, occurred_at_ms=hour + 5, key_id="k2", user_id="u", model="m", status_code=200),
        make_event(
            "r", 2, occurred_at_ms=hour + HOUR_MS - 1, key_id="k2", user_id="u", model="m", status_code=500
        ),
        make_event(
            "r", 3, occurred_at_ms=hour + HOUR_MS, key_id="k2", user_id="u", model="m", status_code=429
        ),
        make_event("r", 4, occurred_at_ms=hour, key_id="k1", user_id="u", model="m", status_code=200),
    ]
    deltas = rollups(to_row(e, logged_at_ms=0) for e in events)
    assert [(d["hour_ms"], d["key_id"]) for d in deltas] == [
        (hour, "k1"),
        (hour, "k2"),
        (hour + HOUR_MS, "k2"),
    ]
    assert [d["requests"] for d in deltas] == [1, 2, 1]
    assert [d["failed_requests"] for d in deltas] == [0, 1, 1]
    e1, e2 = events[0], events[1]
    assert deltas[1]["prompt_tokens"] == e1.usage.prompt_tokens + e2.usage.prompt_tokens
    assert deltas[1]["cost_micros"] == e1.cost_micros + e2.cost_micros
    assert deltas[1]["latency_ms"] == e1.latency_ms + e2.latency_ms
    assert len(COLUMNS) == len(to_row(e1, logged_at_ms=0))


async def test_redelivered_events_are_never_counted_twice(database: Database) -> None:
    run_id = unique("o")
    now_ms = int(time.time() * 1000)
    events = [burst_event(run_id, i, now_ms=now_ms) for i in range(600)]
    assert await write(database, events[:400]) == 400
    # The same batch again (offsets lost after the commit), then one overlapping the first.
    assert await write(database, events[:400]) == 0
    assert await write(database, events[300:600] + events[500:550]) == 200
    await assert_landed_exactly_once(database, run_id, events)


async def test_a_redelivered_event_with_other_values_changes_nothing(database: Database) -> None:
    run_id = unique("v")
    now_ms = int(time.time() * 1000)
    original = burst_event(run_id, 1, now_ms=now_ms)
    assert await write(database, [original]) == 1
    changed = burst_event(run_id, 1, now_ms=now_ms)
    changed.cost_micros += 1_000_000
    assert await write(database, [changed]) == 0
    await assert_landed_exactly_once(database, run_id, [original])


async def test_two_writers_with_overlapping_batches_neither_deadlock_nor_double_count(
    database: Database,
) -> None:
    # Two loggers during a rebalance: both hold some of the same events, in different orders.
    run_id = unique("c")
    now_ms = int(time.time() * 1000)
    events = [burst_event(run_id, i, now_ms=now_ms) for i in range(6000)]
    other = Database(database.settings)
    await other.start()
    rng = random.Random(7)
    try:
        for round_start in range(0, 6000, 1500):
            chunk = events[round_start : round_start + 1500]
            first, second = chunk[:1000], chunk[500:]
            rng.shuffle(first)
            rng.shuffle(second)
            stored = await asyncio.wait_for(asyncio.gather(write(database, first), write(other, second)), 30)
            assert sum(stored) == 1500
    finally:
        await other.close()
    await assert_landed_exactly_once(database, run_id, events)


async def test_sqlite_rollups_count_each_stored_row_once(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'logger.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        run_id = unique("s")
        events = [burst_event(run_id, i, now_ms=int(time.time() * 1000)) for i in range(500)]
        assert await write(db, events[:300]) == 300
        assert await write(db, events[200:]) == 200
        assert await write(db, events) == 0
        rolled = await stored_rollups(db, run_id)
        assert rolled == expected_rollups(events)
    finally:
        await db.close()


@pytest.mark.parametrize("size", [1, 5000])
async def test_rollups_and_rows_commit_together(database: Database, size: int) -> None:
    # The row that cannot be stored fails the whole transaction: no rollup is left behind either.
    run_id = unique("x")
    now_ms = int(time.time() * 1000)
    events = [burst_event(run_id, i, now_ms=now_ms) for i in range(size)]
    events.append(burst_event(run_id, size, now_ms=now_ms))
    events[-1].endpoint = "e" * 65
    with pytest.raises(Exception, match="value too long"):
        await write(database, events)
    assert await stored_rollups(database, run_id) == {}
