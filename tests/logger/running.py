"""Running the logger in-process: the whole service, or just its consumer (to watch its state)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.common.db import Database
from services.common.events import ensure_topics
from services.logger.app import run
from services.logger.consumer import LogConsumer, kafka_consumer
from services.logger.dlq import DeadLetters, dead_letter_producer
from services.logger.settings import LoggerSettings
from tests.in_process import in_process


@contextlib.asynccontextmanager
async def running_logger(settings: LoggerSettings) -> AsyncIterator[int]:
    """The whole service (``app.run``) in this event loop; yields its gRPC port, stops it on exit."""
    async with in_process(run, settings, timeout=20) as port:
        yield port


@contextlib.asynccontextmanager
async def running_consumer(settings: LoggerSettings, db: Database) -> AsyncIterator[LogConsumer]:
    """Just the consumer, wired as ``app.run`` wires it, so a test can watch its state."""
    await ensure_topics(settings)
    producer = dead_letter_producer(settings)
    kafka = kafka_consumer(settings)
    await producer.start()
    await kafka.start()
    dead_letters = DeadLetters(producer, topic=settings.dead_letter_topic, group_id=settings.logger_group_id)
    consumer = LogConsumer(
        kafka,
        db=db,
        dead_letters=dead_letters,
        topic=settings.usage_topic,
        policy=settings.batch_policy,
        write_timeout_s=settings.logger_write_timeout_s,
        shutdown_timeout_s=settings.logger_shutdown_timeout_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 20)
        finally:
            await kafka.stop()
            await producer.stop()
