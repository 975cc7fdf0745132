"""Writing usage events: one transaction per batch, idempotent on the primary key, rollups included.

This module owns the mapping between events and rows, both ways. Every ``UsageEvent`` field is a
column of the same name, except ``usage``, whose parts become ``prompt_tokens``,
``completion_tokens``, ``cached_prompt_tokens``, ``images`` and ``usage_estimated``. Redelivered
events carry the same ``(occurred_at_ms, event_id)``, and ``ON CONFLICT DO NOTHING`` on that key makes
a second write of the same event a no-op: the first stored version wins.

The same transaction adds the batch to the hourly rollups (``usage_hourly``), counting only the rows
the insert reports as stored (``RETURNING``), so a redelivered event is never counted twice, and
upserting rollup rows in key order, so two loggers writing at once cannot deadlock on them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import String, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS
from services.logger.models import HOUR_MS, ROLLUP_COUNTERS, RequestLog, UsageHourly

_TABLE = cast(Table, RequestLog.__table__)
_ROLLUPS = cast(Table, UsageHourly.__table__)
ROLLUP_KEY: tuple[str, ...] = ("hour_ms", "key_id", "user_id", "model")
_SYSTEM_CLOCK = SystemClock()

# Event fields stored under their own name: all of them but the nested usage message.
SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in UsageEvent.DESCRIPTOR.fields if f.name != "usage")

# Declared lengths of the string columns (every one of them is an event field of the same name).
_STRING_LIMITS: dict[str, int] = {
    column.name: column.type.length
    for column in _TABLE.columns
    if isinstance(column.type, String) and column.type.length is not None
}


def check_storable(event: UsageEvent) -> None:
    """Raise ``ValueError`` for an event the table cannot hold.

    The consumer dead-letters such events instead of letting one of them fail every write of its batch.
    """
    if event.occurred_at_ms <= 0:
        raise ValueError(f"UsageEvent without occurred_at_ms (got {event.occurred_at_ms})")
    for name, limit in _STRING_LIMITS.items():
        value: str = getattr(event, name)
        if len(value) > limit:
            raise ValueError(f"UsageEvent.{name} has {len(value)} characters; the column holds {limit}")
        if "\x00" in value:
            # PostgreSQL text cannot contain NUL at all.
            raise ValueError(f"UsageEvent.{name} contains a NUL character")


def to_row(event: UsageEvent, *, logged_at_ms: int) -> dict[str, Any]:
    """The ``request_logs`` row of one event."""
    row = {name: getattr(event, name) for name in SCALAR_FIELDS}
    usage = event.usage
    row["prompt_tokens"] = usage.prompt_tokens
    row["completion_tokens"] = usage.completion_tokens
    row["cached_prompt_tokens"] = usage.cached_prompt_tokens
    row["images"] = usage.images
    row["usage_estimated"] = usage.estimated
    row["logged_at_ms"] = logged_at_ms
    return row


def to_event(row: RequestLog) -> UsageEvent:
    """The event a stored row was written from (``logged_at_ms`` is not part of it)."""
    usage = Usage(
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cached_prompt_tokens=row.cached_prompt_tokens,
        images=row.images,
        estimated=row.usage_estimated,
    )
    return UsageEvent(usage=usage, **{name: getattr(row, name) for name in SCALAR_FIELDS})


@functools.cache
def _insert_statement(dialect: str) -> Insert:
    if dialect == "postgresql":
        pg = postgresql.insert(_TABLE).on_conflict_do_nothing(index_elements=["occurred_at_ms", "event_id"])
        return pg.returning(_TABLE.c.occurred_at_ms, _TABLE.c.event_id)
    if dialect == "sqlite":
        lite = sqlite.insert(_TABLE).on_conflict_do_nothing(index_elements=["occurred_at_ms", "event_id"])
        return lite.returning(_TABLE.c.occurred_at_ms, _TABLE.c.event_id)
    raise ValueError(f"no idempotent insert for the {dialect!r} dialect")


@functools.cache
def _rollup_statement(dialect: str) -> Insert:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET counter = counter + excluded.counter``."""
    if dialect == "postgresql":
        pg = postgresql.insert(_ROLLUPS)
        return pg.on_conflict_do_update(
            index_elements=list(ROLLUP_KEY),
            set_={name: _ROLLUPS.c[name] + pg.excluded[name] for name in ROLLUP_COUNTERS},
        )
    if dialect == "sqlite":
        lite = sqlite.insert(_ROLLUPS)
        return lite.on_conflict_do_update(
            index_elements=list(ROLLUP_KEY),
            set_={name: _ROLLUPS.c[name] + lite.excluded[name] for name in ROLLUP_COUNTERS},
        )
    raise ValueError(f"no rollup upsert for the {dialect!r} dialect")


def _rows(events: Sequence[UsageEvent], logged_at_ms: int) -> list[dict[str, Any]]:
    """Rows in primary-key order, each key once.

    Every writer locks keys in the same order, so concurrent batches (two consumers during a
    rebalance) cannot deadlock on each other.
    """
    rows: list[dict[str, Any]] = []
    last_key: tuple[int, str] | None = None
    for event in sorted(events, key=lambda e: (e.occurred_at_ms, e.event_id)):
        key = (event.occurred_at_ms, event.event_id)
        if key != last_key:
            rows.append(to_row(event, logged_at_ms=logged_at_ms))
            last_key = key
    return rows


def rollups(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``usage_hourly`` deltas of ``rows``: one per (hour, key, user, model), sorted by that key.

    The order is the lock order: every writer upserts rollup rows in it, so two transactions never wait
    for each other in a cycle.
    """
    totals: dict[tuple[int, str, str, str], list[int]] = {}
    for row in rows:
        occurred = row["occurred_at_ms"]
        key = (occurred - occurred % HOUR_MS, row["key_id"], row["user_id"], row["model"])
        counters = totals.get(key)
        if counters is None:
            counters = totals[key] = [0] * len(ROLLUP_COUNTERS)
        # Same order as ROLLUP_COUNTERS.
        counters[0] += 1
        counters[1] += row["status_code"] >= 400
        counters[2] += row["prompt_tokens"]
        counters[3] += row["completion_tokens"]
        counters[4] += row["cached_prompt_tokens"]
        counters[5] += row["images"]
        counters[6] += row["cost_micros"]
        counters[7] += row["latency_ms"]
    return [
        {**dict(zip(ROLLUP_KEY, key, strict=True)), **dict(zip(ROLLUP_COUNTERS, counters, strict=True))}
        for key, counters in sorted(totals.items())
    ]


async def write(db: Database, events: Sequence[UsageEvent], *, clock: Clock = _SYSTEM_CLOCK) -> int:
    """Store ``events`` and their rollups in one transaction on the primary; return how many rows were new.

    Events already stored are skipped, and add nothing to the rollups, so writing the same batch twice
    is safe. Either everything is committed or nothing is (the exception propagates).
    """
    if not events:
        return 0
    rows = _rows(events, int(clock.time() * 1000))
    async with db.transaction() as session:
        stored = (await session.execute(_insert_statement(db.dialect), rows)).all()
        if len(stored) == len(rows):
            new_rows = rows
        else:
            keys = {(occurred_at_ms, event_id) for occurred_at_ms, event_id in stored}
            new_rows = [row for row in rows if (row["occurred_at_ms"], row["event_id"]) in keys]
        if new_rows:
            await session.execute(_rollup_statement(db.dialect), rollups(new_rows))
    METRICS.logger_rows.labels(result="inserted").inc(len(new_rows))
    METRICS.logger_rows.labels(result="duplicate").inc(len(events) - len(new_rows))
    return len(new_rows)
