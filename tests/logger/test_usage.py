"""GetUsageSummary over gRPC, reading the rollups on the replica: every grouping and granularity against
totals computed from the events themselves, filters, widening to whole hours, pagination, bad requests."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import pytest

from services.common.db import Database
from services.common.errors import InvalidRequest
from services.common.grpc import Registration, call, serve
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.logger.v1 import logger_pb2, logger_pb2_grpc
from services.common.pb.relaygate.logger.v1.logger_pb2 import (
    GetUsageSummaryRequest,
    GetUsageSummaryResponse,
    UsageBucket,
)
from services.common.tls import LOGGER
from services.logger.models import DAY_MS, HOUR_MS
from services.logger.servicer import SERVICE_NAME, LoggerServicer
from services.logger.usage import widen
from services.logger.writer import write
from tests.db_fixtures import DbUrls
from tests.logger.factories import eventually, make_event, stored_rollups, unique
from tests.tls import client, server_security

KEY, USER, MODEL = (
    logger_pb2.USAGE_GROUP_BY_KEY,
    logger_pb2.USAGE_GROUP_BY_USER,
    logger_pb2.USAGE_GROUP_BY_MODEL,
)
HOUR, DAY = logger_pb2.USAGE_GRANULARITY_HOUR, logger_pb2.USAGE_GRANULARITY_DAY
GroupBy: TypeAlias = logger_pb2.UsageGroupBy.ValueType
Granularity: TypeAlias = logger_pb2.UsageGranularity.ValueType
_FIELD = {KEY: "key_id", USER: "user_id", MODEL: "model"}
_COUNTERS = (
    "requests",
    "failed_requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "images",
    "cost_micros",
    "latency_ms",
)
# Midnight, 2032-06-01 UTC; events cover three days from there.
START_MS = int(datetime.datetime(2032, 6, 1, tzinfo=datetime.UTC).timestamp() * 1000)


def _counters(e: UsageEvent) -> tuple[int, ...]:
    u = e.usage
    return (
        1,
        int(e.status_code >= 400),
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_prompt_tokens,
        u.images,
        e.cost_micros,
        e.latency_ms,
    )


@dataclass(frozen=True)
class Usage:
    stub: logger_pb2_grpc.LoggerServiceAsyncStub
    events: list[UsageEvent]
    run_id: str

    async def page(self, **fields: Any) -> GetUsageSummaryResponse:
        return await call(self.stub.GetUsageSummary, GetUsageSummaryRequest(**fields), timeout=5)

    async def every(self, **fields: Any) -> list[UsageBucket]:
        collected: list[UsageBucket] = []
        cursor = ""
        while True:
            page = await self.page(**fields, cursor=cursor)
            collected.extend(page.buckets)
            if not page.next_cursor:
                return collected
            cursor = page.next_cursor

    def expected(
        self,
        group_by: Iterable[GroupBy] = (),
        granularity: Granularity = HOUR,
        since_ms: int = 0,
        until_ms: int = 0,
        filters: Mapping[str, str] | None = None,
    ) -> list[tuple[Any, ...]]:
        """(bucket, key, user, model, *counters) rows, in the order the API returns them."""
        width = DAY_MS if granularity == DAY else HOUR_MS
        since, until = widen(since_ms, until_ms)
        fields = {_FIELD[g] for g in group_by}
        totals: dict[tuple[Any, ...], list[int]] = {}
        for e in self.events:
            if any(getattr(e, name) != value for name, value in (filters or {}).items()):
                continue
            if (since and e.occurred_at_ms < since) or (until and e.occurred_at_ms >= until):
                continue
            key = (
                e.occurred_at_ms - e.occurred_at_ms % width,
                *(getattr(e, f) if f in fields else "" for f in ("key_id", "user_id", "model")),
            )
            row = totals.setdefault(key, [0] * len(_COUNTERS))
            for slot, value in enumerate(_counters(e)):
                row[slot] += value
        return [(*key, *row) for key, row in sorted(totals.items())]


def _flat(buckets: Iterable[UsageBucket]) -> list[tuple[Any, ...]]:
    return [
        (b.bucket_start_ms, b.key_id, b.user_id, b.model, *(getattr(b, c) for c in _COUNTERS))
        for b in buckets
    ]


@pytest.fixture(scope="module")
async def usage(migrated_db: DbUrls) -> AsyncIterator[Usage]:
    """3,000 events over three days (six keys of three users, three models), summarized over gRPC."""
    run_id = unique("u")
    events = [
        make_event(
            run_id,
            i,
            occurred_at_ms=START_MS + (i * 4_567_891) % (3 * DAY_MS),
            key_id=f"{run_id}_k{i % 6}",
            user_id=f"{run_id}_u{i % 6 % 3}",
            model=("gpt-4o", "o3", "gpt-4o-mini")[i // 6 % 3],
            status_code=(200, 200, 200, 404, 500)[i % 5],
        )
        for i in range(3000)
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
        # In three batches, the last one redelivering the first: rollups count each event once.
        assert await write(db, events[:1800]) == 1800
        assert await write(db, events[1800:]) == 1200
        assert await write(db, events[:300]) == 0
        async with client(f"127.0.0.1:{await asyncio.wait_for(started, 10)}", LOGGER) as ch:
            result = Usage(logger_pb2_grpc.LoggerServiceStub(ch), events, run_id)
            expected_total = result.expected()

            async def replicated() -> bool:
                return _flat(await result.every(limit=10_000)) == expected_total

            await eventually(replicated, timeout=3.0, what="the rollups on the replica")
            assert len(await stored_rollups(db, run_id)) > 1000
            yield result
    finally:
        stop.set()
        await server
        await db.close()


@pytest.mark.parametrize("granularity", [HOUR, DAY, logger_pb2.USAGE_GRANULARITY_UNSPECIFIED])
@pytest.mark.parametrize(
    "group_by",
    [[], [KEY], [USER], [MODEL], [KEY, MODEL], [MODEL, USER, KEY], [USER, USER]],
    ids=["total", "key", "user", "model", "key+model", "all", "user twice"],
)
async def test_groupings_and_granularities(
    usage: Usage, group_by: list[GroupBy], granularity: Granularity
) -> None:
    found = _flat(await usage.every(group_by=group_by, granularity=granularity, limit=10_000))
    expected = usage.expected(group_by, DAY if granularity == DAY else HOUR)
    assert found == expected
    assert sum(row[4] for row in found) == 3000


async def test_day_buckets_start_at_utc_midnight(usage: Usage) -> None:
    page = await usage.page(granularity=DAY)
    assert [b.bucket_start_ms for b in page.buckets] == [START_MS, START_MS + DAY_MS, START_MS + 2 * DAY_MS]


@pytest.mark.parametrize(
    "filters",
    [
        {"key_id": "k2"},
        {"user_id": "u1"},
        {"model": "o3"},
        {"key_id": "k4", "model": "gpt-4o"},
        {"user_id": "u0", "key_id": "k1"},
    ],
    ids=["key", "user", "model", "key+model", "nothing matches"],
)
async def test_filters(usage: Usage, filters: dict[str, str]) -> None:
    values = {
        name: f"{usage.run_id}_{value}" if name != "model" else value for name, value in filters.items()
    }
    found = _flat(await usage.every(group_by=[KEY, USER, MODEL], granularity=DAY, **values))
    assert found == usage.expected([KEY, USER, MODEL], DAY, filters=values)
    assert bool(found) == (filters != {"user_id": "u0", "key_id": "k1"})


async def test_range_is_widened_to_whole_hours(usage: Usage) -> None:
    since = START_MS + 5 * HOUR_MS + 1234
    until = START_MS + DAY_MS + 7 * HOUR_MS + 1
    page = await usage.page(group_by=[MODEL], since_ms=since, until_ms=until, limit=10_000)
    assert (page.since_ms, page.until_ms) == (START_MS + 5 * HOUR_MS, START_MS + DAY_MS + 8 * HOUR_MS)
    assert _flat(page.buckets) == usage.expected([MODEL], HOUR, since, until)
    # Open on one side.
    page = await usage.page(granularity=DAY, since_ms=START_MS + 2 * DAY_MS)
    assert (page.since_ms, page.until_ms) == (START_MS + 2 * DAY_MS, 0)
    assert _flat(page.buckets) == usage.expected((), DAY, START_MS + 2 * DAY_MS)


@pytest.mark.parametrize("group_by", [[], [KEY, MODEL]])
async def test_pages_walk_every_bucket_in_order(usage: Usage, group_by: list[GroupBy]) -> None:
    expected = usage.expected(group_by)
    sizes: list[int] = []
    seen: list[tuple[Any, ...]] = []
    cursor = ""
    while True:
        page = await usage.page(group_by=group_by, limit=7, cursor=cursor)
        sizes.append(len(page.buckets))
        seen.extend(_flat(page.buckets))
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == expected
    assert sizes[:-1] == [7] * (len(sizes) - 1)
    assert 0 < sizes[-1] <= 7


async def test_limit_defaults_to_1000_and_is_capped_at_10000(usage: Usage) -> None:
    every = usage.expected([KEY, USER, MODEL])
    assert len(every) > 1000
    page = await usage.page(group_by=[KEY, USER, MODEL])
    assert len(page.buckets) == 1000
    assert page.next_cursor
    page = await usage.page(group_by=[KEY, USER, MODEL], limit=50_000)
    assert _flat(page.buckets) == every


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"cursor": "not a cursor!"}, "cursor", id="garbage cursor"),
        pytest.param(
            {"cursor": "WzEsImEiXQ", "group_by": [KEY, MODEL]}, "cursor", id="cursor of another grouping"
        ),
        pytest.param({"cursor": "WyJ4Il0"}, "cursor", id="cursor with a string bucket"),
        pytest.param({"limit": -1}, "limit", id="negative limit"),
        pytest.param({"since_ms": 200, "until_ms": 100}, "until_ms", id="empty range"),
        pytest.param({"since_ms": -1}, "since_ms", id="negative time"),
        pytest.param({"group_by": [KEY, 9]}, "group_by", id="unknown dimension"),
        pytest.param(
            {"group_by": [logger_pb2.USAGE_GROUP_BY_UNSPECIFIED]}, "group_by", id="unspecified dimension"
        ),
        pytest.param({"granularity": 5}, "granularity", id="unknown granularity"),
    ],
)
async def test_bad_requests_are_refused(usage: Usage, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await usage.page(**fields)
    assert refused.value.param == param
