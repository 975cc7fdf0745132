"""The logger's Kafka consumer: usage events into ``request_logs``, written before offsets are committed.

The loop, batching, pausing, rebalancing and offsets are the shared
:class:`~services.common.consumer.BatchConsumer`'s (its docstring is the contract); this module says
what a message becomes and how a batch is stored::

    record ──▶ decode + check ──▶ batch ──▶ write() (one transaction, ON CONFLICT DO NOTHING)
                   │ unusable
                   └──▶ dead-letter topic (acknowledged before the offset can be committed)

Storage is idempotent (see :mod:`services.logger.writer`), so every event ends up exactly once in
``request_logs`` although delivery is at least once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer

from services.common.batch import BatchPolicy
from services.common.clock import Clock, SystemClock
from services.common.consumer import RETRY_FIRST_S, RETRY_MAX_S, BatchConsumer, Stopped, group_consumer
from services.common.db import Database
from services.common.events import decode
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS
from services.logger.dlq import DeadLetters
from services.logger.settings import LoggerSettings
from services.logger.writer import check_storable, write

log = logging.getLogger(__name__)

_SYSTEM_CLOCK = SystemClock()


def kafka_consumer(settings: LoggerSettings) -> AIOKafkaConsumer:
    """The logger group's consumer of the usage topic (not started, not subscribed)."""
    return group_consumer(
        settings,
        group_id=settings.logger_group_id,
        client_id="relaygate-logger",
        write_timeout_s=settings.logger_write_timeout_s,
    )


class LogConsumer(BatchConsumer[UsageEvent]):
    """Moves usage events from Kafka into ``request_logs``.

    ``consumer`` is a started :func:`kafka_consumer`; the caller closes it after :meth:`run` returns.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        db: Database,
        dead_letters: DeadLetters,
        topic: str,
        policy: BatchPolicy,
        clock: Clock = _SYSTEM_CLOCK,
        write_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            consumer,
            topic=topic,
            policy=policy,
            metrics=METRICS.logger_consumer,
            clock=clock,
            write_timeout_s=write_timeout_s,
            shutdown_timeout_s=shutdown_timeout_s,
        )
        self._db = db
        self._dead_letters = dead_letters

    async def _take(self, record: Any, stop: asyncio.Event) -> UsageEvent | None:
        try:
            event = decode(record.value)
            check_storable(event)
        except ValueError as exc:
            await self._dead_letter(record, exc, stop)
            return None
        return event

    async def _write(self, items: list[UsageEvent]) -> None:
        await write(self._db, items, clock=self._clock)
        now_ms = self._clock.time() * 1000
        for event in items:
            METRICS.logger_end_to_end.observe(max(0.0, now_ms - event.occurred_at_ms) / 1000)

    async def _dead_letter(self, record: Any, reason: Exception, stop: asyncio.Event) -> None:
        """Publish to the dead-letter topic, retrying until it is acknowledged (or stop is requested)."""
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._dead_letters.send(record, reason)
                return
            except Exception:
                if stop.is_set():
                    raise Stopped from None
                log.warning("publishing a dead letter failed; retrying", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
