"""Exactly once under load and failure, against the real broker and PostgreSQL: a 50,000-event burst, a
logger process SIGKILLed in the middle of a batch and restarted, and two logger processes sharing the
partitions through rebalances in the middle of a burst. Every test ends with count and sum checks on the
raw rows, and with the rollups equal both to an aggregate over the raw rows and to the events' totals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import REGISTRY

from services.common.db import Database
from services.common.events import ensure_topics
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.logger.settings import LoggerSettings
from tests.logger.factories import (
    UsageTopic,
    assert_landed_exactly_once,
    burst_event,
    burst_totals,
    eventually,
    unique,
)
from tests.logger.process import LoggerProcess
from tests.logger.running import running_logger


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _lag() -> float:
    return sum(_sample("relaygate_logger_consumer_lag", partition=str(p)) for p in range(4))


async def _rows(database: Database, run_id: str) -> int:
    return (await burst_totals(database, run_id))[0]


async def test_a_burst_of_50000_events_lands_exactly_once(
    logger_settings: Callable[..., LoggerSettings], database: Database
) -> None:
    settings = logger_settings(batch_max_rows=5000, batch_max_seconds=0.5)
    topic = UsageTopic(settings)
    run_id = unique("b")
    now_ms = int(time.time() * 1000)
    events = [burst_event(run_id, i, now_ms=now_ms) for i in range(50_000)]
    duplicates_before = _sample("relaygate_logger_rows_total", result="duplicate")

    async with running_logger(settings):
        await topic.produce(events)
        # Copies of every 25th event, as a relay retrying after a lost acknowledgement sends them.
        await topic.produce(events[::25])

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=60, what="every message committed")

        async def caught_up() -> bool:
            return (
                _lag() == 0
                and REGISTRY.get_sample_value("relaygate_logger_consumer_lag", {"partition": "0"}) is not None
            )

        await eventually(caught_up, timeout=5, what="the lag gauge to read zero")

    await assert_landed_exactly_once(database, run_id, events)
    assert _sample("relaygate_logger_rows_total", result="duplicate") - duplicates_before == 2000


async def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(
    logger_settings: Callable[..., LoggerSettings], database: Database, tmp_path: Path
) -> None:
    settings = logger_settings(batch_max_rows=2000, batch_max_seconds=0.2)
    topic = UsageTopic(settings)
    run_id = unique("k")
    now_ms = int(time.time() * 1000)
    events = [burst_event(run_id, i, now_ms=now_ms) for i in range(20_000)]
    await ensure_topics(settings)
    # A backlog, so the logger is reading or writing a batch at every moment until it is killed.
    await topic.produce(events)

    first = LoggerProcess(settings, tmp_path / "first.log").start()
    try:

        async def some_batches_in() -> bool:
            return await _rows(database, run_id) >= 4000

        await eventually(some_batches_in, timeout=30, what="the first batches")
    finally:
        assert first.kill() == -9
    at_kill = await _rows(database, run_id)
    assert at_kill < len(events), "the logger finished before it was killed; the test proves nothing"
    assert await topic.uncommitted() > 0

    second = LoggerProcess(settings, tmp_path / "second.log").start()
    try:

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=60, what="the restarted logger to commit everything")
    finally:
        assert second.terminate() == 0, second.log_tail()
    assert second.errors() == []
    await assert_landed_exactly_once(database, run_id, events)


async def test_two_processes_share_partitions_through_rebalances_mid_burst(
    logger_settings: Callable[..., LoggerSettings], database: Database, tmp_path: Path
) -> None:
    settings = logger_settings(batch_max_rows=1000, batch_max_seconds=0.2)
    topic = UsageTopic(settings)
    run_id = unique("r")
    now_ms = int(time.time() * 1000)
    await ensure_topics(settings)
    produced: list[UsageEvent] = []
    rebalanced = asyncio.Event()

    async def burst() -> None:
        """1,000 events every 0.1 s until both rebalances are over, then two more seconds of them."""
        stop_at: float | None = None
        while stop_at is None or time.monotonic() < stop_at:
            chunk = [burst_event(run_id, len(produced) + i, now_ms=now_ms) for i in range(1000)]
            await topic.produce(chunk)
            produced.extend(chunk)
            if stop_at is None and rebalanced.is_set():
                stop_at = time.monotonic() + 2.0
            await asyncio.sleep(0.1)

    first = LoggerProcess(settings, tmp_path / "first.log").start()
    second = LoggerProcess(settings, tmp_path / "second.log")
    producing = asyncio.create_task(burst())
    try:

        async def first_is_writing() -> bool:
            return await _rows(database, run_id) >= 3000

        await eventually(first_is_writing, timeout=30, what="the first logger to write")
        # Rebalance 1: a second member joins mid-burst and takes some partitions.
        second.start()

        async def shared() -> bool:
            return any(second.assignments()) and len(first.assignments()) >= 2

        await eventually(shared, timeout=30, what="the partitions to be shared")
        # Mid-burst: the producer keeps going until two seconds after the second rebalance.
        assert not producing.done()
        # Rebalance 2: the first member dies without leaving; the second takes everything back.
        assert first.kill() == -9
        rebalanced.set()

        async def second_took_all() -> bool:
            latest = second.assignments()
            return bool(latest) and len(latest[-1]) == settings.kafka_partitions

        await eventually(second_took_all, timeout=30, what="the second logger to own every partition")
        await asyncio.wait_for(producing, 60)

        async def all_committed() -> bool:
            return await topic.uncommitted() == 0

        await eventually(all_committed, timeout=60, what="every message committed")
    finally:
        producing.cancel()
        first.kill()
        assert second.terminate() == 0, second.log_tail()
    assert second.errors() == []
    first_partitions = {p for assignment in first.assignments() for p in assignment}
    assert len(first_partitions) == settings.kafka_partitions
    await assert_landed_exactly_once(database, run_id, produced)
