"""The logger's composition root: owns every resource, runs the gRPC server, the consumer and partition
maintenance side by side.

Stopping (SIGTERM/SIGINT, or ``stop`` in tests) drains the gRPC server and lets the consumer write and
commit its last batch. If the consumer fails, the server is stopped too and :func:`run` re-raises, so
the process exits non-zero and gets restarted instead of serving reads while nothing is ingested.
Maintenance failures never stop the service (see :mod:`services.logger.partitions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.common import tracing
from services.common.admin_tokens import checked_by_auth
from services.common.clock import SystemClock
from services.common.db import Database
from services.common.events import ensure_topics
from services.common.grpc import Registration, serve
from services.common.pb.relaygate.logger.v1 import logger_pb2_grpc
from services.common.perfboard import service_board
from services.common.redis import redis_client
from services.common.tls import load_tls
from services.logger.consumer import LogConsumer, kafka_consumer
from services.logger.dlq import DeadLetters, dead_letter_producer
from services.logger.partitions import PartitionMaintenance
from services.logger.servicer import SERVICE_NAME, LoggerServicer
from services.logger.settings import LoggerSettings

log = logging.getLogger(__name__)


async def run(
    settings: LoggerSettings,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], None] | None = None,
) -> None:
    """Serve the log and usage queries and ingest usage events until stopped; see the module docstring."""
    stop = stop or asyncio.Event()
    tls = load_tls(settings, environment=settings.environment)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracing.traced("logger"))
        db = Database(settings)
        await db.start()
        stack.push_async_callback(db.close)
        if settings.redis_url:
            # Only for the performance view: the logger keeps no state in Redis.
            redis = redis_client(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            stack.push_async_callback(service_board(redis, "logger").close)

        await ensure_topics(settings)
        producer = dead_letter_producer(settings)
        await producer.start()
        stack.push_async_callback(producer.stop)
        kafka = kafka_consumer(settings)
        await kafka.start()
        # Stopping leaves the group at once, so the partitions move without waiting for a session timeout.
        stack.push_async_callback(kafka.stop)

        consumer = LogConsumer(
            kafka,
            db=db,
            dead_letters=DeadLetters(
                producer, topic=settings.dead_letter_topic, group_id=settings.logger_group_id
            ),
            topic=settings.usage_topic,
            policy=settings.batch_policy,
            write_timeout_s=settings.logger_write_timeout_s,
            shutdown_timeout_s=settings.logger_shutdown_timeout_s,
        )
        maintenance = PartitionMaintenance(
            db, settings.partition_policy, interval_s=settings.log_maintenance_interval_s
        )
        maintaining = asyncio.create_task(maintenance.run(stop), name="logger-partitions")
        consuming = asyncio.create_task(consumer.run(stop), name="logger-consumer")
        consuming.add_done_callback(lambda task: _consumer_done(task, stop))
        security = await stack.enter_async_context(
            checked_by_auth(
                tls,
                auth_addr=settings.auth_addr,
                rpc_timeout_s=settings.rpc_timeout_s,
                cache_s=settings.admin_token_cache_s,
                health_listen=settings.grpc_health_listen,
                clock=SystemClock(),
            )
        )
        try:
            await serve(
                [
                    Registration(
                        SERVICE_NAME, LoggerServicer(db), logger_pb2_grpc.add_LoggerServiceServicer_to_server
                    )
                ],
                listen=settings.logger_listen,
                drain_seconds=settings.grpc_drain_seconds,
                security=security,
                stop=stop,
                on_started=on_started,
            )
        finally:
            stop.set()
            try:
                # Re-raises a consumer failure; after a clean stop it is the last batch being committed.
                await consuming
            finally:
                await maintaining


def _consumer_done(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The traceback is reported once, by whoever awaits the task.
        log.error("consumer failed; stopping the service", extra={"error": repr(task.exception())})
    stop.set()
