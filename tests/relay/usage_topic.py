"""Reading the usage topic back in tests: every event from the start, until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from services.common.config import KafkaSettings
from services.common.events import decode
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent

__all__ = ["read_usage"]


async def read_usage(
    settings: KafkaSettings,
    done: Callable[[list[UsageEvent]], bool],
    *,
    timeout: float,
    linger_ms: int = 0,
) -> list[UsageEvent]:
    """The events on the usage topic, read from the start until ``done(events)`` or ``timeout``; then
    ``linger_ms`` more, so a duplicate beyond what was expected has a chance to show up."""
    consumer = AIOKafkaConsumer(
        settings.usage_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    events: list[UsageEvent] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(events) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                events.extend(decode(record.value) for record in records)
        if linger_ms:
            for records in (await consumer.getmany(timeout_ms=linger_ms)).values():
                events.extend(decode(record.value) for record in records)
    finally:
        await consumer.stop()
    return events
