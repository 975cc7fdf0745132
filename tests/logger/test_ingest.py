"""The logger service end to end: events produced to the real broker land in PostgreSQL exactly once,
poison messages go to the dead-letter topic, and a restart neither loses nor re-reads anything."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY

from services.common.db import Database
from services.common.events import encode, ensure_topics
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.logger.app import run
from services.logger.settings import LoggerSettings
from tests.logger.factories import (
    UsageTopic,
    count_rows,
    eventually,
    make_event,
    stored_ids,
    unique,
)
from tests.logger.running import running_logger


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_events_land_exactly_once(
    logger_settings: Callable[..., LoggerSettings], database: Database
) -> None:
    settings = logger_settings(batch_max_rows=500)
    topic = UsageTopic(settings)
    run_id = unique("e")
    events = [make_event(run_id, i) for i in range(2000)]
    async with running_logger(settings):
        await topic.produce(events)
        # The same events again, as a relay retrying after a lost acknowledgement would send them.
        await topic.produce(events[::10])

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=15, what="every message committed")
    ids = await stored_ids(database, run_id)
    assert len(ids) == 2000
    assert set(ids) == {e.event_id for e in events}


async def test_poison_messages_go_to_the_dead_letter_topic(
    logger_settings: Callable[..., LoggerSettings], database: Database
) -> None:
    settings = logger_settings()
    topic = UsageTopic(settings)
    run_id = unique("p")
    await ensure_topics(settings)
    garbage = b"\xff\x00 not a protobuf \xff"
    no_id = encode(make_event(run_id, 1, event_id=""))
    too_long = encode(make_event(run_id, 2, key_id="k" * 41))
    # All on one partition, in this order, so "the events after the poison" is well defined.
    messages: list[UsageEvent | bytes] = [
        make_event(run_id, 0),
        garbage,
        no_id,
        too_long,
        make_event(run_id, 3),
        make_event(run_id, 4),
    ]
    before = _sample("relaygate_logger_dead_letters_total", reason="ValueError")

    async with running_logger(settings):
        await topic.produce(messages, partition=0)

        async def stored() -> bool:
            return await count_rows(database, run_id) == 3

        await eventually(stored, timeout=10, what="the valid events")

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=10, what="every message committed, poison included")

    assert sorted(await stored_ids(database, run_id)) == [f"{run_id}_{i:06d}" for i in (0, 3, 4)]
    assert _sample("relaygate_logger_dead_letters_total", reason="ValueError") - before == 3

    dlq = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await dlq.start()
    try:
        tp = TopicPartition(settings.dead_letter_topic, 0)
        dlq.assign([tp])
        await dlq.seek_to_beginning(tp)
        fetched = await dlq.getmany(tp, timeout_ms=5000)
        letters = fetched.get(tp, [])
    finally:
        await dlq.stop()
    assert [letter.value for letter in letters] == [garbage, no_id, too_long]
    for offset, letter in zip((1, 2, 3), letters, strict=True):
        headers = dict(letter.headers)
        assert headers["source_topic"] == settings.usage_topic.encode()
        assert headers["source_partition"] == b"0"
        assert headers["source_offset"] == str(offset).encode()
        assert headers["consumer_group"] == settings.logger_group_id.encode()
        assert headers["reason"].startswith(b"ValueError: ")
    assert b"undecodable" in dict(letters[0].headers)["reason"]
    assert b"without event_id" in dict(letters[1].headers)["reason"]
    assert b"key_id has 41 characters" in dict(letters[2].headers)["reason"]


async def test_restart_loses_nothing_and_rereads_nothing(
    logger_settings: Callable[..., LoggerSettings], database: Database
) -> None:
    # Batches close only by size, so the last partial batch is written by the stop itself.
    settings = logger_settings(batch_max_rows=100, batch_max_seconds=60)
    topic = UsageTopic(settings)
    run_id = unique("r")
    first = [make_event(run_id, i) for i in range(550)]
    await ensure_topics(settings)
    await topic.produce(first)

    async with running_logger(settings):

        async def five_batches() -> bool:
            return await count_rows(database, run_id) >= 500

        await eventually(five_batches, timeout=10, what="the full batches")
        assert await count_rows(database, run_id) < 550
    # Stopped: the partial batch was written and committed on the way out.
    assert await count_rows(database, run_id) == 550
    assert await topic.uncommitted() == 0

    rows_before = _sample("relaygate_logger_batch_rows_sum")
    second = [make_event(run_id, i) for i in range(550, 700)]
    async with running_logger(settings):
        await topic.produce(second)

        async def one_more_batch() -> bool:
            return await count_rows(database, run_id) >= 650

        await eventually(one_more_batch, timeout=10, what="a batch of the second run")
    ids = await stored_ids(database, run_id)
    assert len(ids) == len(set(ids)) == 700
    assert await topic.uncommitted() == 0
    # The restarted consumer started at the committed offsets: it wrote only the new events.
    assert _sample("relaygate_logger_batch_rows_sum") - rows_before == 150


async def test_a_consumer_crash_stops_the_service(
    logger_settings: Callable[..., LoggerSettings], database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = logger_settings()
    topic = UsageTopic(settings)
    run_id = unique("x")

    def bug(event: UsageEvent) -> None:
        raise RuntimeError(f"bug while checking {event.event_id}")

    # A programming error, not a bad message: the service must stop rather than idle or skip.
    monkeypatch.setattr("services.logger.consumer.check_storable", bug)
    stop = asyncio.Event()
    service = asyncio.create_task(run(settings, stop=stop))
    await topic.produce([make_event(run_id, 0)])
    with pytest.raises(RuntimeError, match="bug while checking"):
        await asyncio.wait_for(service, 20)
    assert stop.is_set()
    assert await count_rows(database, run_id) == 0
    assert await topic.uncommitted() == 1
