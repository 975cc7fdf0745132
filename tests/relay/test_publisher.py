"""The usage-event publisher against the real broker: normal delivery, an unreachable broker that comes
back with or without its log, a shutdown with events still queued."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from devinfra.backing import BackingServices
from services.common.config import KafkaSettings
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.relay.meter.publisher import EventPublisher
from tests.relay.usage_topic import read_usage


@pytest.fixture
def settings(backing: BackingServices) -> KafkaSettings:
    return KafkaSettings(
        kafka_bootstrap=backing.kafka_bootstrap, kafka_topic_prefix=f"pub{uuid.uuid4().hex[:8]}."
    )


def events(prefix: str, count: int) -> list[UsageEvent]:
    return [UsageEvent(event_id=f"{prefix}-{i:04d}", key_id=f"key_{i % 3}") for i in range(count)]


async def consumed(settings: KafkaSettings, expected: int, timeout: float = 20.0) -> list[str]:
    """Event ids on the usage topic, read from the start until ``expected`` arrived (or timeout); anything
    beyond would be a duplicate, so it is given a moment to show up."""
    events = await read_usage(settings, lambda found: len(found) >= expected, timeout=timeout, linger_ms=500)
    return [event.event_id for event in events]


@pytest.fixture
async def publisher(settings: KafkaSettings, tmp_path: Path) -> AsyncIterator[EventPublisher]:
    publisher = EventPublisher(
        settings, spool_dir=tmp_path / "spool", send_timeout_s=2.0, shutdown_timeout_s=3.0
    )
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def in_key_order(ids: list[str], sent: list[UsageEvent]) -> bool:
    """Each key's events arrived in the order they were published (one partition per key)."""
    by_key: dict[str, list[str]] = {}
    key_of = {e.event_id: e.key_id for e in sent}
    for event_id in ids:
        by_key.setdefault(key_of[event_id], []).append(event_id)
    return all(chain == sorted(chain) for chain in by_key.values())


async def test_events_reach_the_topic(settings: KafkaSettings, publisher: EventPublisher) -> None:
    sent = events("ok", 50)
    for event in sent:
        publisher.publish(event)
    ids = await consumed(settings, 50)
    assert sorted(ids) == [e.event_id for e in sent]
    assert in_key_order(ids, sent)


async def test_records_are_keyed_by_user(settings: KafkaSettings, publisher: EventPublisher) -> None:
    # One partition holds all of a user's events, in order: the consumers that settle money each own
    # whole accounts.
    publisher.publish(UsageEvent(event_id="keyed-1", key_id="key_a", user_id="usr_1"))
    consumer = AIOKafkaConsumer(
        settings.usage_topic, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=20)
    finally:
        await consumer.stop()
    assert record.key == b"usr_1"


@pytest.mark.parametrize("lose_log", [False, True], ids=["log-kept", "log-lost"])
async def test_an_unreachable_broker_spools_and_replays_in_order(
    settings: KafkaSettings, publisher: EventPublisher, broker: BackingServices, lose_log: bool
) -> None:
    before = events("before", 5)
    for event in before:
        publisher.publish(event)
    await wait_until(lambda: publisher.queued == 0 and publisher.spooled == 0)
    await consumed(settings, 5)

    if lose_log:
        broker.erase_kafka()
    else:
        broker.stop_kafka()
    during = events("during", 40)
    for event in during:
        publisher.publish(event)  # never blocks
        await asyncio.sleep(0.01)
    await wait_until(lambda: publisher.spooled >= 40)

    broker.start_kafka()
    await wait_until(lambda: publisher.spooled == 0 and publisher.queued == 0, timeout=30)
    ids = await consumed(settings, 45)
    # Everything arrives exactly once (a sorted list keeps duplicates); when the broker came back
    # without its log, the events it had acknowledged before were sent again.
    assert sorted(ids) == sorted(e.event_id for e in before + during)
    # The spooled events were replayed in the order they were published.
    assert in_key_order([i for i in ids if i.startswith("during")], during)


async def test_a_shutdown_spools_what_kafka_did_not_take_and_the_next_start_replays_it(
    settings: KafkaSettings, tmp_path: Path, broker: BackingServices
) -> None:
    spool = tmp_path / "spool"
    first = EventPublisher(settings, spool_dir=spool, send_timeout_s=1.0, shutdown_timeout_s=0.5)
    await first.start()
    broker.stop_kafka()
    sent = events("shutdown", 30)
    for event in sent:
        first.publish(event)
    await first.close()
    assert list(spool.rglob("*.seg")), "the events should be on disk"

    broker.start_kafka()
    second = EventPublisher(settings, spool_dir=spool, send_timeout_s=2.0)
    await second.start()
    try:
        await wait_until(lambda: second.spooled == 0, timeout=30)
        ids = await consumed(settings, 30)
    finally:
        await second.close()
    assert sorted(ids) == [e.event_id for e in sent]
    assert list(spool.rglob("*.seg")) == []


async def test_an_unwritable_spool_leaves_events_in_memory(settings: KafkaSettings, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    publisher = EventPublisher(settings, spool_dir=blocker / "spool", send_timeout_s=2.0)
    await publisher.start()  # reported, not fatal
    try:
        sent = events("memory", 10)
        for event in sent:
            publisher.publish(event)
        ids = await consumed(settings, 10)
    finally:
        await publisher.close()
    assert sorted(ids) == [e.event_id for e in sent]
