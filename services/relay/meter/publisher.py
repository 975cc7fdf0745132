"""The relay's usage-event publisher: a response never waits for Kafka::

    publish() ──▶ memory queue ──▶ producer ──▶ Kafka
        │  (broker unreachable, queue full,    ▲
        │   or anything already spooled)       │ replayed in order once the broker is back
        └────────────▶ Spool (disk) ───────────┘

* **Order**: while anything is spooled, new events are spooled behind it, so replay preserves the
  order of publication.
* **Clean shutdown** (:meth:`EventPublisher.close`): queued events get ``shutdown_timeout_s`` to
  reach Kafka; whatever has not is written to the spool, which the next start replays. A spool left by
  a process that is gone (its lock is free) is adopted and replayed too.
* **A broker that lost its log** (ephemeral storage, an unclean failover) is noticed when a
  partition's offsets go back, or when the usage topic is missing after an outage. The topics are
  created again and events acknowledged in the last ``retain_s`` are sent again. Redelivery is
  harmless: the logger stores each ``event_id`` once.
* **Bounded**: the spool holds at most ``spool_max_bytes``; beyond that new events are dropped and
  counted (``relaygate_events_dropped``), since the ledger, not the log, is the record of money.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaProducer

from services.common import tracing
from services.common.config import KafkaSettings
from services.common.events import create_missing_topics, encode
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS
from services.relay.meter.spool import Record, Spool

__all__ = ["EventPublisher"]

log = logging.getLogger(__name__)

# How long a producer may take to stop (flush), and each step of dropping one that did not.
_STOP_S = 2.0
# Acknowledged events kept for a broker that loses them, at most (memory bound under load).
_MAX_RETAINED = 20_000

# A record on its way to Kafka: key, encoded event, and the trace context of the request it records
# (record headers; None while tracing is off). The spool keeps key and event only: an event replayed
# after an outage still names its trace (UsageEvent.trace_id), its consumers just do not link to it.
Outgoing = tuple[bytes, bytes, tracing.Carrier | None]


class BrokerUnavailable(Exception):
    """The producer could not deliver a batch in time."""


class EventPublisher:
    """Memory queue, spool and one Kafka producer; owned by a lifespan (see the module docstring).

    ``spool_dir`` None keeps events in memory only (tests and tools): they wait there, bounded by
    ``max_queue`` (beyond it they are dropped and counted), until the broker is back.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 256 * 1024 * 1024,
        max_queue: int = 10_000,
        max_batch: int = 500,
        retain_s: float = 30.0,
        send_timeout_s: float = 5.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self._topic = settings.usage_topic
        self._spool = Spool(spool_dir, max_bytes=spool_max_bytes) if spool_dir is not None else None
        self._queue: collections.deque[Outgoing] = collections.deque()
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._retain_s = retain_s
        self._send_timeout_s = send_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Told each acknowledged batch's produce latency (the performance view's windows).
        self.on_produced: Callable[[float], None] | None = None
        # The batch being sent and whether it came from the memory queue (not the spool).
        self._inflight: list[Outgoing] = []
        self._inflight_from_queue = False
        # Acknowledged records kept for a broker that loses them: (monotonic time, record).
        self._acked: collections.deque[tuple[float, Outgoing]] = collections.deque()
        self._high_offsets: dict[int, int] = {}
        self._outage = False

    @property
    def spooled(self) -> int:
        return self._spool.records if self._spool is not None else 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        """Open the spool and try the broker; an unreachable broker is retried in the background.

        A spool directory that cannot be written (a read-only filesystem, say) is reported and the
        relay runs without it, rather than not at all: events then wait in memory only."""
        if self._spool is not None:
            try:
                self._spool.open()
            except OSError as exc:
                log.error("the event spool is unavailable; usage events wait in memory only: %s", exc)
                self._spool = None
        try:
            await self._connect()
        except Exception as exc:
            log.warning("Kafka unreachable at startup; usage events are spooled until it is back: %s", exc)
            self._outage = True
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def publish(self, event: UsageEvent) -> None:
        """Hand ``event`` over; never waits for the broker.

        Records are keyed by user id: one partition holds all of a user's events in order, so each
        consumer of the topic that settles money owns a disjoint set of accounts."""
        with tracing.producing(self._topic):
            self._accept((event.user_id.encode(), encode(event), tracing.traceparent()))

    def _accept(self, record: Outgoing) -> None:
        spool = self._spool
        if spool is not None and (
            spool.records or self._producer is None or len(self._queue) >= self._max_queue
        ):
            if spool.append([_stored(record)]):
                self._wakeup.set()
                return
            self._dropped(1)
            return
        if len(self._queue) >= self._max_queue and spool is None:
            self._dropped(1)
            return
        self._queue.append(record)
        METRICS.events_queued.set(len(self._queue))
        self._wakeup.set()

    @staticmethod
    def _dropped(count: int) -> None:
        METRICS.events_dropped.inc(count)
        log.error("usage events dropped: the spool is full", extra={"dropped": count})

    async def close(self) -> None:
        """Hand queued events to Kafka (bounded by ``shutdown_timeout_s``), spool the rest, stop.

        What Kafka has not taken is spooled even when the caller cuts this short (a shutdown whose
        deadline passed while events were still being delivered)."""
        try:
            await self._deliver_queued()
        finally:
            self._spool_leftover()
        await self._disconnect()

    async def _deliver_queued(self) -> None:
        task = self._task
        if task is None:
            return
        try:
            deadline = time.monotonic() + self._shutdown_timeout_s
            while (
                self._queue or (self._inflight and self._inflight_from_queue)
            ) and time.monotonic() < deadline:
                if task.done():
                    break
                await asyncio.sleep(0.01)
        finally:
            await cancel_and_wait(task)

    def _spool_leftover(self) -> None:
        leftover = (self._inflight if self._inflight_from_queue else []) + list(self._queue)
        self._inflight, self._queue = [], collections.deque()
        if leftover:
            if self._spool is not None:
                kept = self._spool.append([_stored(record) for record in leftover])
                if kept < len(leftover):
                    self._dropped(len(leftover) - kept)
                log.info("usage events spooled at shutdown", extra={"records": kept})
            else:
                self._dropped(len(leftover))
        if self._spool is not None:
            self._spool.close()

    # --- the sending loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if self._producer is None:
                try:
                    await self._connect()
                except Exception as exc:
                    if not self._outage:
                        log.warning("Kafka unreachable; spooling usage events: %s", exc)
                    self._outage = True
                    self._spill()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.1
            spool = self._spool
            try:
                if spool is not None and spool.records:
                    batch: list[Outgoing] = [
                        (key, payload, None) for key, payload in spool.peek(self._max_batch)
                    ]
                    await self._send(batch, from_queue=False)
                    spool.commit(len(batch))
                elif self._queue:
                    batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                    METRICS.events_queued.set(len(self._queue))
                    await self._send(batch, from_queue=True)
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
            except BrokerUnavailable as exc:
                if not self._outage:
                    log.warning("producing usage events failed; spooling them: %s", exc)
                self._outage = True
                if self._inflight_from_queue:
                    self._queue.extendleft(reversed(self._inflight))
                self._inflight = []
                await self._disconnect()
                self._spill()

    async def _send(self, batch: list[Outgoing], *, from_queue: bool) -> None:
        producer = self._producer
        assert producer is not None
        self._inflight, self._inflight_from_queue = batch, from_queue
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._send_timeout_s):
                futures = [
                    await producer.send(self._topic, payload, key=key, headers=headers)
                    for key, payload, headers in batch
                ]
                acks = await asyncio.gather(*futures)
        except Exception as exc:
            METRICS.events_produced.labels(result="failed").inc(len(batch))
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._inflight = []
        METRICS.events_produced.labels(result="sent").inc(len(batch))
        latency = time.perf_counter() - started
        METRICS.events_produce_latency.observe(latency)
        if self.on_produced is not None:
            self.on_produced(latency)
        if self._outage:
            self._outage = False
            log.info("Kafka reachable again; spooled events are being replayed")
        # Offsets that go back mean the broker lost its log, with whatever it had acknowledged.
        lost = any(ack.offset <= self._high_offsets.get(ack.partition, -1) for ack in acks)
        if lost:
            self._high_offsets.clear()
            earlier = [record for _, record in self._acked]
            self._acked.clear()
            self._resend(earlier)
        for ack in acks:
            self._high_offsets[ack.partition] = max(ack.offset, self._high_offsets.get(ack.partition, -1))
        self._retain(batch)

    def _retain(self, batch: list[Outgoing]) -> None:
        if self._retain_s <= 0:
            return
        now = time.monotonic()
        acked = self._acked
        acked.extend((now, record) for record in batch)
        horizon = now - self._retain_s
        while acked and (acked[0][0] < horizon or len(acked) > _MAX_RETAINED):
            acked.popleft()

    def _resend(self, records: list[Outgoing]) -> None:
        if not records:
            return
        log.warning(
            "the broker lost acknowledged usage events; sending them again", extra={"records": len(records)}
        )
        METRICS.events_resent.inc(len(records))
        for record in records:
            self._accept(record)

    def _spill(self) -> None:
        """Move the memory queue to the spool (the broker is away; keep order, free memory)."""
        if self._spool is None or not self._queue:
            return
        records = [_stored(record) for record in self._queue]
        self._queue.clear()
        kept = self._spool.append(records)
        if kept < len(records):
            self._dropped(len(records) - kept)
        METRICS.events_queued.set(0)

    async def _connect(self) -> None:
        created = await create_missing_topics(self.settings)
        if self._topic in created and (self._high_offsets or self._acked):
            # The topic existed before: the broker came back without its log.
            self._high_offsets.clear()
            records = [record for _, record in self._acked]
            self._acked.clear()
            if records:
                self._resend(records)
        # Idempotence: a batch retried after a lost acknowledgement is written once, in order.
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=int(self._send_timeout_s * 1000),
        )
        try:
            await producer.start()
        except Exception:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer

    async def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(_STOP_S):
                await producer.stop()
        except Exception:
            # stop() flushes first, and an idempotent producer retries a batch until the broker takes
            # it: left running, it would deliver the batches now in the spool a second time once the
            # broker is back. aiokafka has no public abort; its sender task is cancelled here. Both
            # are bounded too: the cancelled sender still awaits its in-flight produce requests.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_STOP_S):
                    await producer._sender.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_STOP_S):
                    await producer.client.close()


def _stored(record: Outgoing) -> Record:
    """What the spool keeps of a record (see :data:`Outgoing`)."""
    return record[0], record[1]
