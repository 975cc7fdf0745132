"""Refusals before the key is known: the first of each second one by one, the rest as one summary."""

from __future__ import annotations

import asyncio

from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.relay.meter.refusals import RefusalLog

SECOND_MS = 1_800_000_000_000


def refused(i: int, at_ms: int) -> UsageEvent:
    return UsageEvent(
        event_id=f"req-{i}",
        occurred_at_ms=at_ms,
        endpoint="chat",
        status_code=401,
        end_reason="refused",
        error_type="caller",
        error_code="invalid_api_key",
        client_ip="203.0.113.9",
    )


async def test_a_flood_is_logged_as_the_first_few_and_one_summary_per_second() -> None:
    published: list[UsageEvent] = []
    log = RefusalLog(published.append, per_second=3, relay_id="relay_a")

    for i in range(1000):
        log.record(refused(i, SECOND_MS + i % 1000))
    assert [e.event_id for e in published] == ["req-0", "req-1", "req-2"]

    # The next second's first refusal closes the previous second's summary.
    log.record(refused(1000, SECOND_MS + 1000))
    summary = published[3]
    assert summary.event_id == f"refusals-relay_a-{SECOND_MS // 1000}"
    assert (summary.aggregated, summary.status_code, summary.error_code) == (997, 401, "invalid_api_key")
    assert (summary.key_id, summary.user_id, summary.occurred_at_ms) == ("", "", SECOND_MS)
    assert published[4].event_id == "req-1000"
    # Every request is accounted for, once.
    assert sum(max(1, e.aggregated) for e in published) == 1001


async def test_a_flood_that_stops_is_summarised_by_the_timer() -> None:
    published: list[UsageEvent] = []
    log = RefusalLog(published.append, per_second=1, relay_id="relay_b")
    now_ms = SECOND_MS + 10
    for i in range(5):
        log.record(refused(i, now_ms))
    assert len(published) == 1
    await asyncio.sleep(1.2)
    assert [e.aggregated for e in published] == [0, 4]
    log.flush()  # nothing left: no empty summary
    assert len(published) == 2
