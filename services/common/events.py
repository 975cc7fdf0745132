"""Usage events on Kafka: topics, encoding, and the relay-side publisher.

Events are ``relaygate.events.v1.UsageEvent`` protobufs, keyed by API key id so that one partition
orders one key's events. The publisher never blocks a response on the broker: ``publish`` puts the
event on a bounded in-memory queue and a background task hands batches to the producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.config import KafkaSettings
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS

log = logging.getLogger(__name__)

# Kafka error code for "topic already exists" in a CreateTopics response.
_TOPIC_ALREADY_EXISTS = 36


def encode(event: UsageEvent) -> bytes:
    return event.SerializeToString()


def decode(payload: bytes) -> UsageEvent:
    """Parse one event; raises ``ValueError`` when the payload is not a valid event."""
    event = UsageEvent()
    try:
        event.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise ValueError(f"undecodable UsageEvent: {exc}") from exc
    if not event.event_id:
        raise ValueError("UsageEvent without event_id")
    return event


async def ensure_topics(settings: KafkaSettings) -> None:
    """Create the usage and dead-letter topics if they do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(
                    settings.usage_topic, num_partitions=settings.kafka_partitions, replication_factor=1
                ),
                NewTopic(settings.dead_letter_topic, num_partitions=1, replication_factor=1),
            ]
        )
        for topic, code, *_ in getattr(response, "topic_errors", []):
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"could not create topic {topic}: error code {code}")
    finally:
        await admin.close()


class EventPublisher:
    """Bounded queue in front of one Kafka producer; owned by a lifespan.

    ``publish`` never waits for the broker. When the queue is full the caller waits for room
    (backpressure) rather than dropping an event.
    """

    def __init__(self, settings: KafkaSettings, *, max_queue: int = 10_000, max_batch: int = 500) -> None:
        self.settings = settings
        self._queue: asyncio.Queue[UsageEvent] = asyncio.Queue(max_queue)
        self._max_batch = max_batch
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            linger_ms=5,
            compression_type=None,
            request_timeout_ms=10_000,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def publish(self, event: UsageEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            await self._queue.put(event)
        METRICS.events_queued.set(self._queue.qsize())

    async def close(self, *, timeout: float = 10.0) -> None:
        """Flush what is queued (bounded by ``timeout``), then stop the producer."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except TimeoutError:
                log.error("event queue not drained on shutdown", extra={"pending": self._queue.qsize()})
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._producer.stop()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._send(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
                METRICS.events_queued.set(self._queue.qsize())

    async def _send(self, batch: list[UsageEvent]) -> None:
        started = time.perf_counter()
        while True:
            try:
                futures = [
                    await self._producer.send(
                        self.settings.usage_topic, encode(event), key=event.key_id.encode()
                    )
                    for event in batch
                ]
                await asyncio.gather(*futures)
                METRICS.events_produced.labels(result="sent").inc(len(batch))
                METRICS.events_produce_latency.observe(time.perf_counter() - started)
                return
            except Exception:
                # Redelivery is harmless (the logger dedupes on event_id), loss is not: retry.
                METRICS.events_produced.labels(result="failed").inc(len(batch))
                log.warning("producing usage events failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)
