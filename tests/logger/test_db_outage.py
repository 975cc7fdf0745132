"""A database outage under the logger's queries is a 503 with Retry-After (gRPC UNAVAILABLE), never a
500; the logger answers again once the database is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from services.common.errors import ServiceUnavailable
from services.common.grpc import call
from services.common.pb.relaygate.logger.v1 import logger_pb2 as pb
from services.common.pb.relaygate.logger.v1 import logger_pb2_grpc
from services.common.tls import LOGGER
from services.logger.settings import LoggerSettings
from tests.common.tcp_gate import TcpGate
from tests.db_fixtures import DbUrls
from tests.logger.running import running_logger
from tests.tls import client

TIMEOUT = 5.0


async def test_log_and_usage_queries_answer_503_while_the_database_is_unreachable(
    logger_settings: Callable[..., LoggerSettings], migrated_db: DbUrls
) -> None:
    gate = TcpGate.for_url(migrated_db.primary)
    await gate.open()
    settings = logger_settings(database_url=gate.url(migrated_db.primary), database_replica_urls=[])
    try:
        async with running_logger(settings) as port, client(f"127.0.0.1:{port}", LOGGER) as chan:
            stub = logger_pb2_grpc.LoggerServiceStub(chan)

            def queries() -> list[Awaitable[object]]:
                # Each call is typed on its own: in the list, the element type would bind the
                # response type to object, which the (invariant) stub methods do not match.
                logs = call(stub.ListRequestLogs, pb.ListRequestLogsRequest(limit=5), timeout=TIMEOUT)
                usage = call(stub.GetUsageSummary, pb.GetUsageSummaryRequest(), timeout=TIMEOUT)
                return [logs, usage]

            for query in queries():
                await query

            await gate.close()
            for query in queries():
                with pytest.raises(ServiceUnavailable) as caught:
                    await query
                assert caught.value.status == 503 and caught.value.retry_after

            await gate.open()
            deadline = time.monotonic() + 10
            while True:
                try:
                    for query in queries():
                        await query
                    break
                except ServiceUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
    finally:
        await gate.close()
