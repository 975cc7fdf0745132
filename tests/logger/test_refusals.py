"""Requests refused before their key was known are logged too: one row each, or one summary row per
second standing for many under a flood; admin log listings and the hourly rollups count them."""

from __future__ import annotations

from sqlalchemy import select

from services.common.db import Database
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.logger.models import HOUR_MS, UsageHourly
from services.logger.query import LogQuery, list_request_logs
from services.logger.writer import write
from tests.logger.factories import BASE_MS, unique


def refusal(
    event_id: str, model: str, *, occurred_at_ms: int = BASE_MS + 5, aggregated: int = 0
) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        occurred_at_ms=occurred_at_ms,
        model=model,
        endpoint="chat",
        status_code=401,
        end_reason="refused",
        error_type="caller",
        error_code="invalid_api_key",
        client_ip="203.0.113.9",
        aggregated=aggregated,
    )


async def test_pre_auth_refusals_and_their_flood_summary_are_stored_listed_and_counted(
    database: Database,
) -> None:
    model = unique("m-refused")
    one = refusal(unique("req"), model)
    summary = refusal(unique("refusals-relay-"), model, occurred_at_ms=BASE_MS + 1000, aggregated=250)

    assert await write(database, [one, summary]) == 2

    page = await list_request_logs(database, LogQuery(model=model))
    listed = {log.event_id: log for log in page.rows}
    assert set(listed) == {one.event_id, summary.event_id}
    assert (listed[one.event_id].key_id, listed[one.event_id].user_id) == ("", "")
    assert (listed[one.event_id].aggregated, listed[summary.event_id].aggregated) == (0, 250)
    assert listed[summary.event_id].error_code == "invalid_api_key"

    async with database.reader(consistent=True) as session:
        rollup = (
            await session.scalars(
                select(UsageHourly).where(
                    UsageHourly.model == model, UsageHourly.hour_ms == BASE_MS - BASE_MS % HOUR_MS
                )
            )
        ).one()
    assert (rollup.key_id, rollup.requests, rollup.failed_requests) == ("", 251, 251)
