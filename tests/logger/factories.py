"""Helpers of the logger tests: events, producing to the real broker, and reading back what the logger
stored or committed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from uuid import uuid4

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from sqlalchemy import func, select

from services.common.db import Database
from services.common.events import encode
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.logger.models import RequestLog
from services.logger.settings import LoggerSettings

BASE_MS = 1_760_000_000_000


def unique(prefix: str) -> str:
    return f"{prefix}{uuid4().hex[:10]}"


def make_event(run_id: str, i: int, **fields: Any) -> UsageEvent:
    """An event with every field set to something other than its default."""
    values: dict[str, Any] = {
        "event_id": f"{run_id}_{i:06d}",
        "occurred_at_ms": BASE_MS + i,
        "key_id": f"key_{i % 7}",
        "user_id": f"usr_{i % 3}",
        "model": "gpt-4o" if i % 2 else "gpt-4o-mini",
        "upstream_model": "gpt-4o-2024-08-06",
        "channel_id": "chn_openai",
        "endpoint": "/v1/chat/completions",
        "stream": bool(i % 2),
        "status_code": 200 if i % 5 else 429,
        "usage": Usage(
            prompt_tokens=10 + i, completion_tokens=20 + i, cached_prompt_tokens=3, images=1, estimated=True
        ),
        "cost_micros": 1_234 + i,
        "price_id": 7,
        "reservation_id": f"rsv_{run_id}_{i}",
        "latency_ms": 250,
        "ttfb_ms": 40,
        "upstream_ms": 200,
        "end_reason": "done",
        "error_type": "policy" if i % 5 == 0 else "",
        "error_code": "rate_limit_exceeded" if i % 5 == 0 else "",
        "attempts": 2,
        "client_ip": "10.0.0.7",
        "cached": i % 3 == 0,
    }
    values.update(fields)
    return UsageEvent(**values)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def stored_ids(db: Database, run_id: str, *, replica: bool = False) -> list[str]:
    """Event ids of one test's rows (duplicates would show up twice), from the primary by default."""
    async with db.reader(consistent=not replica) as session:
        result = await session.scalars(
            select(RequestLog.event_id).where(RequestLog.event_id.like(f"{run_id}\\_%", escape="\\"))
        )
        return list(result.all())


async def count_rows(db: Database, run_id: str) -> int:
    async with db.reader(consistent=True) as session:
        value = await session.scalar(
            select(func.count())
            .select_from(RequestLog)
            .where(RequestLog.event_id.like(f"{run_id}\\_%", escape="\\"))
        )
        return int(value or 0)


class UsageTopic:
    """One test's usage topic: produces to it and remembers how far each partition got.

    The ends come from the produce acknowledgements because Tansu answers ListOffsets (``end_offsets``)
    with wrong values.
    """

    def __init__(self, settings: LoggerSettings) -> None:
        self.settings = settings
        self.ends: dict[int, int] = {}

    async def produce(self, messages: Iterable[UsageEvent | bytes], *, partition: int | None = None) -> None:
        """Produce events (keyed by key id, as the relay does) or raw payloads; wait for every ack."""
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            pending = []
            for message in messages:
                if isinstance(message, UsageEvent):
                    value, key = encode(message), message.key_id.encode()
                else:
                    value, key = message, b"raw"
                pending.append(
                    await producer.send(self.settings.usage_topic, value, key=key, partition=partition)
                )
            for sent in await asyncio.gather(*pending):
                self.ends[sent.partition] = max(self.ends.get(sent.partition, 0), sent.offset + 1)
        finally:
            await producer.stop()

    async def uncommitted(self) -> int:
        """Messages produced beyond the logger group's committed offsets (its lag)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.logger_group_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            lag = 0
            for partition, end in self.ends.items():
                committed = await consumer.committed(TopicPartition(self.settings.usage_topic, partition))
                lag += end - (committed or 0)
            return lag
        finally:
            await consumer.stop()
