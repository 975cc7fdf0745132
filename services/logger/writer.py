"""Writing usage events into ``request_logs``: one transaction per batch, idempotent on the primary key.

This module owns the mapping between events and rows, both ways. Every ``UsageEvent`` field is a
column of the same name, except ``usage``, whose parts become ``prompt_tokens``,
``completion_tokens``, ``cached_prompt_tokens``, ``images`` and ``usage_estimated``. Redelivered
events carry the same ``(occurred_at_ms, event_id)``, and ``ON CONFLICT DO NOTHING`` on that key makes
a second write of the same event a no-op: the first stored version wins.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import String, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.logger.models import RequestLog

_TABLE = cast(Table, RequestLog.__table__)
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
        return pg.returning(_TABLE.c.event_id)
    if dialect == "sqlite":
        lite = sqlite.insert(_TABLE).on_conflict_do_nothing(index_elements=["occurred_at_ms", "event_id"])
        return lite.returning(_TABLE.c.event_id)
    raise ValueError(f"no idempotent insert for the {dialect!r} dialect")


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


async def write(db: Database, events: Sequence[UsageEvent], *, clock: Clock = _SYSTEM_CLOCK) -> int:
    """Store ``events`` in one transaction on the primary; return how many rows were new.

    Events already stored are skipped, so writing the same batch twice is safe. Either every row is
    committed or none is (the exception propagates and nothing is stored).
    """
    if not events:
        return 0
    rows = _rows(events, int(clock.time() * 1000))
    statement = _insert_statement(db.dialect)
    async with db.transaction() as session:
        result = await session.execute(statement, rows)
        return len(result.all())
