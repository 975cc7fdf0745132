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
from sqlalchemy import func, select, text

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


# --- bursts: events of one run, with their own keys, and the checks that they landed exactly once ------

HOUR_MS = 3_600_000
_COUNTERS = ("requests", "failed", "prompt", "completion", "cached", "images", "cost", "latency")


def burst_event(run_id: str, i: int, *, now_ms: int) -> UsageEvent:
    """Event ``i`` of a burst: keys, users and models of this run only, spread over the last three hours
    (so over several rollup hours, and over day partitions the logger has created)."""
    return UsageEvent(
        event_id=f"{run_id}_{i:06d}",
        occurred_at_ms=now_ms - (i * 7919) % (3 * HOUR_MS),
        key_id=f"{run_id}_k{i % 40:02d}",
        # A key belongs to one user, as in the gateway.
        user_id=f"{run_id}_u{i % 40 % 8}",
        model=("gpt-4o", "gpt-4o-mini", "o3")[i % 3],
        endpoint="/v1/chat/completions",
        status_code=200 if i % 11 else 502,
        usage=Usage(
            prompt_tokens=i % 997, completion_tokens=i % 389, cached_prompt_tokens=i % 5, images=i % 2
        ),
        cost_micros=1 + i % 10_007,
        latency_ms=i % 1500,
    )


def expected_rollups(events: Iterable[UsageEvent]) -> dict[tuple[int, str, str, str], tuple[int, ...]]:
    """What ``usage_hourly`` must hold for these events, each counted once."""
    totals: dict[tuple[int, str, str, str], list[int]] = {}
    for e in {e.event_id: e for e in events}.values():
        key = (e.occurred_at_ms - e.occurred_at_ms % HOUR_MS, e.key_id, e.user_id, e.model)
        row = totals.setdefault(key, [0] * len(_COUNTERS))
        values = (
            1,
            int(e.status_code >= 400),
            e.usage.prompt_tokens,
            e.usage.completion_tokens,
            e.usage.cached_prompt_tokens,
            e.usage.images,
            e.cost_micros,
            e.latency_ms,
        )
        for slot, value in enumerate(values):
            row[slot] += value
    return {key: tuple(row) for key, row in totals.items()}


_RAW_AGGREGATE = text(
    "SELECT occurred_at_ms - occurred_at_ms % 3600000, key_id, user_id, model, count(*), "
    "sum(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens), sum(completion_tokens), "
    "sum(cached_prompt_tokens), sum(images), sum(cost_micros), sum(latency_ms) FROM request_logs "
    "WHERE key_id LIKE :pattern ESCAPE '\\' GROUP BY 1, 2, 3, 4"
)
_ROLLUPS = text(
    "SELECT hour_ms, key_id, user_id, model, requests, failed_requests, prompt_tokens, completion_tokens, "
    "cached_prompt_tokens, images, cost_micros, latency_ms FROM usage_hourly "
    "WHERE key_id LIKE :pattern ESCAPE '\\'"
)


def _keyed(rows: Iterable[Any]) -> dict[tuple[int, str, str, str], tuple[int, ...]]:
    return {(int(r[0]), r[1], r[2], r[3]): tuple(int(v) for v in r[4:]) for r in rows}


async def raw_aggregate(db: Database, run_id: str) -> dict[tuple[int, str, str, str], tuple[int, ...]]:
    """An aggregate over the raw rows of one run's keys, shaped like ``usage_hourly`` (from the primary)."""
    async with db.reader(consistent=True) as session:
        return _keyed(await session.execute(_RAW_AGGREGATE, {"pattern": f"{run_id}\\_%"}))


async def stored_rollups(db: Database, run_id: str) -> dict[tuple[int, str, str, str], tuple[int, ...]]:
    """``usage_hourly`` rows of one run's keys (from the primary)."""
    async with db.reader(consistent=True) as session:
        return _keyed(await session.execute(_ROLLUPS, {"pattern": f"{run_id}\\_%"}))


async def burst_totals(db: Database, run_id: str) -> tuple[int, int, int, int]:
    """Rows, distinct event ids, sum of costs and sum of prompt tokens of one run's keys."""
    async with db.reader(consistent=True) as session:
        row = (
            await session.execute(
                text(
                    "SELECT count(*), count(DISTINCT event_id), coalesce(sum(cost_micros), 0), "
                    "coalesce(sum(prompt_tokens), 0) FROM request_logs WHERE key_id LIKE :pattern ESCAPE '\\'"
                ),
                {"pattern": f"{run_id}\\_%"},
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def expected_totals(events: Iterable[UsageEvent]) -> tuple[int, int, int, int]:
    unique_events = list({e.event_id: e for e in events}.values())
    return (
        len(unique_events),
        len(unique_events),
        sum(e.cost_micros for e in unique_events),
        sum(e.usage.prompt_tokens for e in unique_events),
    )


async def assert_landed_exactly_once(db: Database, run_id: str, events: list[UsageEvent]) -> None:
    """Count and sum checks on the raw rows, and rollups equal both to an aggregate over the raw rows
    and to what the events add up to."""
    assert await burst_totals(db, run_id) == expected_totals(events)
    rollups = await stored_rollups(db, run_id)
    assert rollups == await raw_aggregate(db, run_id)
    assert rollups == expected_rollups(events)
