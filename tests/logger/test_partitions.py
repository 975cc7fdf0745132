"""Day partitions of request_logs on PostgreSQL: the migration that partitions the table, creation ahead of
time, rows parked in the default partition, and retention that drops whole old days and nothing newer."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from pathlib import Path

import pytest
from alembic import command
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devinfra.backing import BackingServices
from devinfra.postgres import psql
from services.common.config import DatabaseSettings, normalize_database_url
from services.common.db import Database
from services.logger.models import DAY_MS
from services.logger.partitions import (
    DEFAULT_PARTITION,
    PartitionMaintenance,
    PartitionPolicy,
    list_partitions,
    maintain,
    partition_name,
)
from services.logger.writer import write
from services.migrations import alembic_config, upgrade
from tests.log_records import extra
from tests.logger.factories import eventually, make_event, raw_aggregate, stored_rollups, unique

# Noon, 2031-03-15 UTC: far from the days other tests write, so this module's partitions are its own.
NOW_MS = int(datetime.datetime(2031, 3, 15, 12, tzinfo=datetime.UTC).timestamp() * 1000)
TODAY = NOW_MS - NOW_MS % DAY_MS


def _day(offset: int) -> int:
    return TODAY + offset * DAY_MS


async def _rows_per_table(db: Database, run_id: str) -> dict[str, int]:
    """Where one run's rows physically are: partition name -> row count."""
    async with db.writer() as session:
        result = await session.execute(
            text(
                "SELECT tableoid::regclass::text, count(*) FROM request_logs "
                "WHERE event_id LIKE :pattern ESCAPE '\\' GROUP BY 1"
            ),
            {"pattern": f"{run_id}\\_%"},
        )
        return {str(name): int(count) for name, count in result}


def test_partition_names_are_utc_days() -> None:
    assert partition_name(_day(0)) == "request_logs_p20310315"
    assert partition_name(_day(-15)) == "request_logs_p20310228"


@pytest.mark.parametrize(("days_ahead", "retention_days"), [(0, 0), (7, -1)])
def test_policy_refuses_nonsense(days_ahead: int, retention_days: int) -> None:
    with pytest.raises(ValueError, match="days"):
        PartitionPolicy(days_ahead=days_ahead, retention_days=retention_days)


async def test_migration_partitions_the_log_table(database: Database) -> None:
    async with database.writer() as session:
        kinds: dict[str, str] = dict(
            (
                await session.execute(
                    text(
                        "SELECT relname, relkind::text FROM pg_class "
                        "WHERE relname IN ('request_logs', 'request_logs_default', 'usage_hourly')"
                    )
                )
            ).all()
        )
        key = await session.scalar(text("SELECT pg_get_partkeydef('request_logs'::regclass)"))
        indexes = set(
            await session.scalars(text("SELECT indexname FROM pg_indexes WHERE tablename = 'request_logs'"))
        )
    assert kinds == {"request_logs": "p", "request_logs_default": "r", "usage_hourly": "r"}
    assert key == "RANGE (occurred_at_ms)"
    assert indexes == {"pk_request_logs", "ix_request_logs_key_time", "ix_request_logs_user_time"}


async def test_maintenance_creates_partitions_ahead_once(database: Database) -> None:
    policy = PartitionPolicy(days_ahead=3)
    first = await maintain(database, policy, now_ms=NOW_MS)
    assert first.created == [partition_name(_day(offset)) for offset in range(-1, 4)]
    again = await maintain(database, policy, now_ms=NOW_MS)
    assert (again.created, again.dropped) == ([], [])
    days = {(p.from_ms, p.to_ms) for p in await list_partitions(database)}
    assert {(_day(o), _day(o + 1)) for o in range(-1, 4)} <= days

    # Rows land in their day's partition; a day without one goes to the default partition.
    run_id = unique("a")
    events = [
        make_event(run_id, 0, occurred_at_ms=_day(0) + 5),
        make_event(run_id, 1, occurred_at_ms=_day(3) + DAY_MS - 1),
        make_event(run_id, 2, occurred_at_ms=_day(40)),
    ]
    assert await write(database, events) == 3
    assert await _rows_per_table(database, run_id) == {
        partition_name(_day(0)): 1,
        partition_name(_day(3)): 1,
        DEFAULT_PARTITION: 1,
    }


async def test_concurrent_maintenance_from_two_processes_agrees(database: Database) -> None:
    other = Database(database.settings)
    await other.start()
    try:
        policy = PartitionPolicy(days_ahead=2)
        now = NOW_MS + 100 * DAY_MS
        results = await asyncio.gather(
            maintain(database, policy, now_ms=now), maintain(other, policy, now_ms=now)
        )
    finally:
        await other.close()
    created = sorted(results[0].created + results[1].created)
    assert created == sorted(partition_name(now - now % DAY_MS + o * DAY_MS) for o in range(-1, 3))


async def test_rows_parked_in_the_default_partition_move_to_their_new_partition(database: Database) -> None:
    run_id = unique("d")
    late_day = _day(200)
    # The logger was down for longer than days_ahead: events of a day with no partition yet.
    events = [
        make_event(run_id, i, occurred_at_ms=late_day + i * 1000, key_id=f"{run_id}_k") for i in range(50)
    ]
    events.append(make_event(run_id, 50, occurred_at_ms=late_day + 9 * DAY_MS, key_id=f"{run_id}_k"))
    assert await write(database, events) == 51
    assert await _rows_per_table(database, run_id) == {DEFAULT_PARTITION: 51}

    result = await maintain(database, PartitionPolicy(days_ahead=2), now_ms=late_day + 1)
    assert partition_name(late_day) in result.created
    assert await _rows_per_table(database, run_id) == {partition_name(late_day): 50, DEFAULT_PARTITION: 1}
    # Moving rows between partitions does not touch the rollups: they still match the raw rows.
    rollups = await stored_rollups(database, run_id)
    assert sum(counters[0] for counters in rollups.values()) == 51
    assert rollups == await raw_aggregate(database, run_id)


async def test_retention_drops_old_days_and_never_newer_ones(database: Database) -> None:
    base = _day(400)
    await maintain(database, PartitionPolicy(days_ahead=1), now_ms=base)
    for offset in (-40, -31, -30, -29, -5):
        await maintain(database, PartitionPolicy(days_ahead=1), now_ms=base + offset * DAY_MS)
    run_id = unique("t")
    offsets = [-40, -31, -30, -29, -5, 0]
    key = f"{run_id}_k"
    events = [
        make_event(run_id, i * 10 + j, occurred_at_ms=base + offset * DAY_MS + j * 3_600_000, key_id=key)
        for i, offset in enumerate(offsets)
        for j in range(3)
    ]
    # Two rows no partition covers (days -60 and -10): they sit in the default partition.
    events += [
        make_event(run_id, 900, occurred_at_ms=base - 60 * DAY_MS, key_id=key),
        make_event(run_id, 901, occurred_at_ms=base - 10 * DAY_MS, key_id=key),
    ]
    assert await write(database, events) == len(events)
    before = await _rows_per_table(database, run_id)
    assert before == {
        **{partition_name(base + o * DAY_MS): 3 for o in offsets},
        DEFAULT_PARTITION: 2,
    }
    rollups_before = await stored_rollups(database, run_id)
    assert len(rollups_before) == len(events)

    result = await maintain(database, PartitionPolicy(days_ahead=1, retention_days=30), now_ms=base + 1)

    # Cutoff: the start of day -30. Days -40 and -31 end on or before it; day -30 holds rows as new as it.
    gone = {partition_name(base + o * DAY_MS) for o in (-40, -31)}
    assert gone <= set(result.dropped)
    assert not {p.name for p in await list_partitions(database)} & gone
    after = await _rows_per_table(database, run_id)
    assert after == {
        **{partition_name(base + o * DAY_MS): 3 for o in (-30, -29, -5, 0)},
        DEFAULT_PARTITION: 1,
    }
    assert result.deleted_rows >= 1
    # Every partition left ends after the cutoff.
    assert all(p.to_ms > base - 30 * DAY_MS for p in await list_partitions(database))
    # Rollups keep the totals of the dropped days.
    assert await stored_rollups(database, run_id) == rollups_before

    again = await maintain(database, PartitionPolicy(days_ahead=1, retention_days=30), now_ms=base + 1)
    assert (again.dropped, again.deleted_rows) == ([], 0)
    assert await _rows_per_table(database, run_id) == after


async def test_a_failing_pass_is_counted_and_the_task_keeps_going(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # INFO, as in the service: the records of a pass are built, not skipped by the level check.
    caplog.set_level(logging.INFO, logger="services.logger.partitions")
    failures = REGISTRY.get_sample_value("relaygate_logger_maintenance_failures_total") or 0.0
    broken = Database(DatabaseSettings(database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"))
    try:
        assert await PartitionMaintenance(broken, PartitionPolicy(), interval_s=3600).run_once() is None
    finally:
        await broken.close()
    assert REGISTRY.get_sample_value("relaygate_logger_maintenance_failures_total") == failures + 1

    # The service's task: a pass at once (on the system clock), then one per interval until stopped.
    stop = asyncio.Event()
    task = asyncio.create_task(PartitionMaintenance(database, PartitionPolicy(), interval_s=3600).run(stop))
    today = int(time.time() * 1000) // DAY_MS * DAY_MS

    async def today_exists() -> bool:
        return any(p.from_ms == today for p in await list_partitions(database))

    try:
        await eventually(today_exists, timeout=5, what="today's partition")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    [summary] = [r for r in caplog.records if r.msg == "partition maintenance"]
    assert partition_name(today) in extra(summary, "partitions_created", list)


async def test_migration_keeps_rows_logged_before_it_and_rolls_them_up(backing: BackingServices) -> None:
    primary, _ = backing.create_database(f"t_{unique('mig')}")
    await upgrade(primary, "0001")
    psql(
        primary,
        "INSERT INTO request_logs SELECT 1760000000000 + g * 3600000, 'e' || g, 'k' || g % 3, 'u', 'm', '', "
        "'', '/v1', false, CASE WHEN g % 4 = 0 THEN 500 ELSE 200 END, g, 1, 0, 0, false, 10, 1, '', 5, 0, 0, "
        "'', '', '', 1, '', false, 0 FROM generate_series(1, 100) g",
    )
    await upgrade(primary)
    assert psql(primary, "SELECT relkind FROM pg_class WHERE relname = 'request_logs'") == "p"
    assert psql(primary, "SELECT count(*), sum(prompt_tokens) FROM request_logs") == "100|5050"
    # Five days of rows: five day partitions, nothing in the default one.
    assert psql(primary, f"SELECT count(*) FROM {DEFAULT_PARTITION}") == "0"
    assert psql(primary, "SELECT count(DISTINCT tableoid) FROM request_logs") == "5"
    assert psql(
        primary, "SELECT sum(requests), sum(failed_requests), sum(cost_micros) FROM usage_hourly"
    ) == ("100|25|1000")

    engine = create_async_engine(normalize_database_url(primary))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), "0001"))
    finally:
        await engine.dispose()
    assert psql(primary, "SELECT relkind FROM pg_class WHERE relname = 'request_logs'") == "r"
    assert psql(primary, "SELECT count(*), sum(prompt_tokens) FROM request_logs") == "100|5050"
    assert psql(primary, "SELECT count(*) FROM pg_class WHERE relname = 'usage_hourly'") == "0"


async def test_sqlite_keeps_a_plain_table_with_retention_by_delete(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'logger.db'}"
    await upgrade(url)
    db = Database(DatabaseSettings(database_url=url))
    await db.start()
    try:
        events = [make_event("s", i, occurred_at_ms=_day(-i)) for i in range(40)]
        assert await write(db, events) == 40
        assert await list_partitions(db) == []
        kept = await maintain(db, PartitionPolicy(), now_ms=NOW_MS)
        assert (kept.created, kept.dropped, kept.deleted_rows) == ([], [], 0)
        result = await maintain(db, PartitionPolicy(retention_days=30), now_ms=NOW_MS)
        # Days 0..30 are kept (day -30 starts exactly at the cutoff), days 31..39 are deleted.
        assert result.deleted_rows == 9
        async with db.reader() as session:
            oldest = await session.scalar(text("SELECT min(occurred_at_ms) FROM request_logs"))
        assert oldest == _day(-30)
    finally:
        await db.close()
