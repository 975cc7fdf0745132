"""The consumer under stress: a rebalance writes the batch before partitions go, and a failing database
pauses fetching, commits nothing, and resumes once writes succeed again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from services.common.db import Database
from services.common.events import ensure_topics
from services.logger.settings import LoggerSettings
from tests.logger.factories import UsageTopic, count_rows, eventually, make_event, unique
from tests.logger.running import running_consumer


async def test_rebalance_writes_the_batch_before_giving_up_partitions(
    logger_settings: Callable[..., LoggerSettings], database: Database
) -> None:
    # Batches never close on their own here: only revocation and stop write them.
    settings = logger_settings(batch_max_rows=100_000, batch_max_seconds=300)
    topic = UsageTopic(settings)
    run_id = unique("b")
    await ensure_topics(settings)
    await topic.produce([make_event(run_id, i) for i in range(400)])

    async with running_consumer(settings, database) as first:

        async def all_read() -> bool:
            return first.pending == 400

        await eventually(all_read, timeout=10, what="the first consumer to read everything")
        assert await count_rows(database, run_id) == 0

        async with running_consumer(settings, database) as second:

            async def written() -> bool:
                return await count_rows(database, run_id) == 400

            await eventually(written, timeout=10, what="the revoked batch to be written")
            assert await topic.uncommitted() == 0

            more = [make_event(run_id, i) for i in range(400, 500)]
            await topic.produce(more)

            async def shared() -> bool:
                return first.pending + second.pending == 100

            await eventually(shared, timeout=10, what="both consumers to read the new events")
        # The second consumer left: its stop and the first one's revocation wrote their parts.

        async def all_written() -> bool:
            return await count_rows(database, run_id) == 500

        await eventually(all_written, timeout=10, what="both parts written")
    assert await topic.uncommitted() == 0


def _lag() -> float:
    return sum(
        REGISTRY.get_sample_value("relaygate_logger_consumer_lag", {"partition": str(p)}) or 0.0
        for p in range(4)
    )


@pytest.fixture
async def refusing_inserts(database: Database) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Make every insert into request_logs fail (a raising trigger) until the yielded callable is awaited."""
    statements = [
        "CREATE FUNCTION refuse_request_logs() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'request_logs is refusing inserts (test)'; END $$",
        "CREATE TRIGGER refuse_request_logs BEFORE INSERT ON request_logs "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_request_logs()",
    ]
    async with database.transaction() as session:
        for statement in statements:
            await session.execute(text(statement))

    async def accept() -> None:
        async with database.transaction() as session:
            await session.execute(text("DROP TRIGGER IF EXISTS refuse_request_logs ON request_logs"))
            await session.execute(text("DROP FUNCTION IF EXISTS refuse_request_logs()"))

    try:
        yield accept
    finally:
        await accept()


async def test_failing_writes_pause_fetching_and_commit_nothing(
    logger_settings: Callable[..., LoggerSettings],
    database: Database,
    refusing_inserts: Callable[[], Awaitable[None]],
) -> None:
    settings = logger_settings(batch_max_rows=1000, batch_max_seconds=0.1)
    topic = UsageTopic(settings)
    run_id = unique("f")
    await ensure_topics(settings)
    await topic.produce([make_event(run_id, i) for i in range(300)])

    async with running_consumer(settings, database) as consumer:

        async def paused() -> bool:
            return consumer.paused

        await eventually(paused, timeout=10, what="the consumer to pause after a failed write")
        held = consumer.pending
        assert 0 < held <= 300

        async def lagging() -> bool:
            return _lag() == 300

        # Nothing is committed: the lag is every message the fetches have seen.
        await eventually(lagging, timeout=5, what="the lag gauge to count the uncommitted messages")
        # Paused partitions are not fetched from: more traffic does not pile up in memory.
        more = [make_event(run_id, i) for i in range(300, 2300)]
        await topic.produce(more)
        await asyncio.sleep(1.0)
        assert consumer.paused
        assert consumer.pending == held
        assert await count_rows(database, run_id) == 0
        assert await topic.uncommitted() == 2300

        await refusing_inserts()

        async def recovered() -> bool:
            return not consumer.paused and await count_rows(database, run_id) == 2300

        await eventually(recovered, timeout=15, what="the retries to write everything")

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=5, what="every offset committed")

        async def caught_up() -> bool:
            return _lag() == 0

        await eventually(caught_up, timeout=5, what="the lag gauge to read zero")
