"""ListRequestLogs through a real gRPC server, reading from the replica: filters, newest-first order and
keyset pagination (ties on the timestamp included), limits, and refusal of bad requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.common.db import Database
from services.common.errors import InvalidRequest
from services.common.grpc import Registration, call, serve
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.logger.v1 import logger_pb2_grpc
from services.common.pb.relaygate.logger.v1.logger_pb2 import ListRequestLogsRequest, ListRequestLogsResponse
from services.common.tls import LOGGER
from services.logger.query import encode_cursor
from services.logger.servicer import SERVICE_NAME, LoggerServicer
from services.logger.writer import write
from tests.db_fixtures import DbUrls
from tests.logger.factories import BASE_MS, eventually, make_event, stored_ids, unique
from tests.tls import client, server_security


@dataclass(frozen=True)
class Logs:
    stub: logger_pb2_grpc.LoggerServiceAsyncStub
    events: list[UsageEvent]

    async def page(self, **fields: Any) -> ListRequestLogsResponse:
        return await call(self.stub.ListRequestLogs, ListRequestLogsRequest(**fields), timeout=5)

    async def every(self, **fields: Any) -> list[UsageEvent]:
        """Every page, following the cursors."""
        collected: list[UsageEvent] = []
        cursor = ""
        while True:
            page = await self.page(**fields, cursor=cursor)
            collected.extend(page.logs)
            if not page.next_cursor:
                return collected
            cursor = page.next_cursor

    def expected(self, keep: Callable[[UsageEvent], bool] = lambda e: True) -> list[str]:
        chosen = [e for e in self.events if keep(e)]
        return [
            e.event_id for e in sorted(chosen, key=lambda e: (e.occurred_at_ms, e.event_id), reverse=True)
        ]


@pytest.fixture(scope="module")
async def logs(migrated_db: DbUrls) -> AsyncIterator[Logs]:
    """1,230 stored events (30 sharing one timestamp) and a LoggerService reading them on the replica."""
    run_id = unique("q")
    events = [make_event(run_id, i) for i in range(200)]
    events += [make_event(run_id, i, occurred_at_ms=BASE_MS + 500) for i in range(200, 230)]
    events += [
        make_event(run_id, i, key_id="key_bulk", occurred_at_ms=BASE_MS - i) for i in range(1000, 2000)
    ]
    db = Database(migrated_db.settings())
    await db.start()
    stop = asyncio.Event()
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve(
            [
                Registration(
                    SERVICE_NAME, LoggerServicer(db), logger_pb2_grpc.add_LoggerServiceServicer_to_server
                )
            ],
            listen="127.0.0.1:0",
            drain_seconds=0.5,
            security=server_security(LOGGER),
            stop=stop,
            on_started=started.set_result,
        )
    )
    try:
        assert await write(db, events) == len(events)

        async def replicated() -> bool:
            return len(await stored_ids(db, run_id, replica=True)) == len(events)

        await eventually(replicated, timeout=2.0, what="the rows on the replica")
        async with client(f"127.0.0.1:{await asyncio.wait_for(started, 10)}", LOGGER) as ch:
            yield Logs(logger_pb2_grpc.LoggerServiceStub(ch), events)
    finally:
        stop.set()
        await server
        await db.close()


async def test_pages_walk_every_row_newest_first(logs: Logs) -> None:
    seen: list[str] = []
    sizes: list[int] = []
    cursor = ""
    while True:
        page = await logs.page(limit=300, cursor=cursor)
        sizes.append(len(page.logs))
        seen.extend(e.event_id for e in page.logs)
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert sizes == [300, 300, 300, 300, 30]
    assert seen == logs.expected()


async def test_cursor_splits_rows_sharing_a_timestamp(logs: Logs) -> None:
    # Rows 200..229 share one timestamp: pages of 7 cut through them and still see each once, in order.
    window = {"since_ms": BASE_MS + 500, "until_ms": BASE_MS + 501}
    pages = []
    cursor = ""
    while True:
        page = await logs.page(limit=7, cursor=cursor, **window)
        pages.append([e.event_id for e in page.logs])
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [i for p in pages for i in p] == logs.expected(lambda e: e.occurred_at_ms == BASE_MS + 500)


async def test_limit_defaults_to_50_and_is_capped_at_1000(logs: Logs) -> None:
    page = await logs.page()
    assert len(page.logs) == 50
    assert page.next_cursor
    page = await logs.page(limit=5000)
    assert len(page.logs) == 1000
    assert [e.event_id for e in page.logs] == logs.expected()[:1000]


@pytest.mark.parametrize(
    ("fields", "keep"),
    [
        pytest.param({"key_id": "key_3"}, lambda e: e.key_id == "key_3", id="key"),
        pytest.param({"user_id": "usr_1"}, lambda e: e.user_id == "usr_1", id="user"),
        pytest.param({"model": "gpt-4o"}, lambda e: e.model == "gpt-4o", id="model"),
        pytest.param({"status_code": 429}, lambda e: e.status_code == 429, id="status"),
        pytest.param({"error_type": "policy"}, lambda e: e.error_type == "policy", id="fault class"),
        pytest.param(
            {"since_ms": BASE_MS + 50, "until_ms": BASE_MS + 120},
            lambda e: BASE_MS + 50 <= e.occurred_at_ms < BASE_MS + 120,
            id="time range",
        ),
        pytest.param({"since_ms": BASE_MS + 190}, lambda e: e.occurred_at_ms >= BASE_MS + 190, id="since"),
        pytest.param({"until_ms": BASE_MS - 1990}, lambda e: e.occurred_at_ms < BASE_MS - 1990, id="until"),
        pytest.param(
            {"key_id": "key_bulk", "user_id": "usr_2", "model": "gpt-4o-mini", "until_ms": BASE_MS - 1500},
            lambda e: (
                e.key_id == "key_bulk"
                and e.user_id == "usr_2"
                and e.model == "gpt-4o-mini"
                and e.occurred_at_ms < BASE_MS - 1500
            ),
            id="combined",
        ),
        pytest.param({"key_id": "key_nobody"}, lambda e: False, id="no match"),
    ],
)
async def test_filters(logs: Logs, fields: dict[str, object], keep: Callable[[UsageEvent], bool]) -> None:
    found = [e.event_id for e in await logs.every(limit=100, **fields)]
    assert found == logs.expected(keep)


async def test_logs_carry_the_whole_event(logs: Logs) -> None:
    page = await logs.page(key_id="key_2", limit=1000)
    by_id = {e.event_id: e for e in logs.events}
    assert page.logs
    for log in page.logs:
        assert log == by_id[log.event_id]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"cursor": "not a cursor!"}, "cursor", id="garbage cursor"),
        pytest.param({"cursor": encode_cursor(5, "")}, "cursor", id="cursor without id"),
        pytest.param({"cursor": "LTU6ZXZ0"}, "cursor", id="negative time in cursor"),
        pytest.param({"limit": -1}, "limit", id="negative limit"),
        pytest.param({"status_code": -200}, "status_code", id="negative status"),
        pytest.param({"error_type": "upstream"}, "error_type", id="unknown fault class"),
        pytest.param({"since_ms": 200, "until_ms": 100}, "until_ms", id="empty range"),
        pytest.param({"since_ms": -1}, "since_ms", id="negative time"),
    ],
)
async def test_bad_requests_are_refused(logs: Logs, fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await logs.page(**fields)
    assert refused.value.param == param
