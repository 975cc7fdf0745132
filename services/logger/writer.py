"""Writing usage events: one transaction per batch, idempotent on the primary key, rollups included.

This module owns the mapping between events and rows, both ways. Every ``UsageEvent`` field is a
column of the same name, except ``usage``, whose parts become ``prompt_tokens``,
``completion_tokens``, ``cached_prompt_tokens``, ``images``, ``cache_write_tokens``,
``reasoning_tokens`` and ``usage_estimated``. Redelivered
events carry the same ``(occurred_at_ms, event_id)``, and ``ON CONFLICT DO NOTHING`` on that key makes
a second write of the same event a no-op: the first stored version wins.

The same transaction adds the batch to the hourly rollups (``usage_hourly``), counting only the rows
the insert reports as stored (``RETURNING``), so a redelivered event is never counted twice, and
upserting rollup rows in key order, so two loggers writing at once cannot deadlock on them.

On PostgreSQL the rows travel by ``COPY`` (binary) into a session-local staging table and move from
there with one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``: about three times faster
than a multi-row ``INSERT`` with bound parameters, on the client and on the server. The staging table
is created (if missing) inside each batch's transaction and emptied at every commit, so it works the
same behind a transaction-pooling proxy. SQLite takes the plain ``INSERT``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import String, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert

from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS
from services.logger.models import HOUR_MS, ROLLUP_COUNTERS, RequestLog, UsageHourly

_TABLE = cast(Table, RequestLog.__table__)
_ROLLUPS = cast(Table, UsageHourly.__table__)
_SYSTEM_CLOCK = SystemClock()

# Event fields stored under their own name: all of them but the nested usage message.
SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in UsageEvent.DESCRIPTOR.fields if f.name != "usage")
_USAGE_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "images",
    "cache_write_tokens",
    "reasoning_tokens",
)
_USAGE_COLUMNS = (*_USAGE_FIELDS, "usage_estimated")
# A row is a tuple in this column order.
COLUMNS: tuple[str, ...] = (*SCALAR_FIELDS, *_USAGE_COLUMNS, "logged_at_ms")
_SCALARS = operator.attrgetter(*SCALAR_FIELDS)
_USAGE = operator.attrgetter(*_USAGE_FIELDS, "estimated")
_AT = {name: index for index, name in enumerate(COLUMNS)}
_PRIMARY_KEY = operator.itemgetter(_AT["occurred_at_ms"], _AT["event_id"])

ROLLUP_KEY: tuple[str, ...] = ("hour_ms", "key_id", "user_id", "model")

# Declared lengths of the string columns (every one of them is an event field of the same name).
_STRING_LIMITS: dict[str, int] = {
    column.name: column.type.length
    for column in _TABLE.columns
    if isinstance(column.type, String) and column.type.length is not None
}
_STRINGS = operator.attrgetter(*_STRING_LIMITS)
_LIMITS = tuple(_STRING_LIMITS.values())

_STAGE = "request_logs_stage"
_COLUMN_LIST = ", ".join(COLUMNS)
_CREATE_STAGE = f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (LIKE request_logs) ON COMMIT DELETE ROWS"
# ORDER BY: rows are inserted, and their keys locked, in primary-key order (see _rows).
_MOVE_STAGED = (
    f"INSERT INTO request_logs ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGE} "
    "ORDER BY occurred_at_ms, event_id "
    "ON CONFLICT (occurred_at_ms, event_id) DO NOTHING RETURNING occurred_at_ms, event_id"
)


def check_storable(event: UsageEvent) -> None:
    """Raise ``ValueError`` for an event the table cannot hold.

    The consumer dead-letters such events instead of letting one of them fail every write of its batch.
    """
    if event.occurred_at_ms <= 0:
        raise ValueError(f"UsageEvent without occurred_at_ms (got {event.occurred_at_ms})")
    values = _STRINGS(event)
    # One pass in C over all strings (this runs for every event); the slow path says which one failed.
    # PostgreSQL text cannot contain NUL at all.
    if "\x00" in "".join(values) or any(map(operator.gt, map(len, values), _LIMITS)):
        _refuse_string(event)


def _refuse_string(event: UsageEvent) -> None:
    for name, limit in _STRING_LIMITS.items():
        value: str = getattr(event, name)
        if len(value) > limit:
            raise ValueError(f"UsageEvent.{name} has {len(value)} characters; the column holds {limit}")
        if "\x00" in value:
            raise ValueError(f"UsageEvent.{name} contains a NUL character")
    raise ValueError("UsageEvent has a string the table cannot hold")


def to_row(event: UsageEvent, *, logged_at_ms: int) -> tuple[Any, ...]:
    """The ``request_logs`` row of one event, in :data:`COLUMNS` order."""
    return (*_SCALARS(event), *_USAGE(event.usage), logged_at_ms)


def to_event(row: RequestLog) -> UsageEvent:
    """The event a stored row was written from (``logged_at_ms`` is not part of it)."""
    usage = Usage(estimated=row.usage_estimated, **{name: getattr(row, name) for name in _USAGE_FIELDS})
    return UsageEvent(usage=usage, **{name: getattr(row, name) for name in SCALAR_FIELDS})


def _rows(events: Sequence[UsageEvent], logged_at_ms: int) -> list[tuple[Any, ...]]:
    """Rows in primary-key order, each key once.

    Every writer locks keys in the same order, so concurrent batches (two consumers during a
    rebalance) cannot deadlock on each other.
    """
    # Sorting the row tuples is several times cheaper than sorting by protobuf attributes.
    rows = sorted((to_row(event, logged_at_ms=logged_at_ms) for event in events), key=_PRIMARY_KEY)
    unique: list[tuple[Any, ...]] = []
    last_key: tuple[int, str] | None = None
    for row in rows:
        key = _PRIMARY_KEY(row)
        if key != last_key:
            unique.append(row)
            last_key = key
    return unique


def rollups(rows: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The ``usage_hourly`` deltas of ``rows``: one per (hour, key, user, model), sorted by that key.

    The order is the lock order: every writer upserts rollup rows in it, so two transactions never wait
    for each other in a cycle.
    """
    at = _AT
    occurred_i, key_i, user_i, model_i = (at[n] for n in ("occurred_at_ms", "key_id", "user_id", "model"))
    status_i = at["status_code"]
    aggregated_i = at["aggregated"]
    summed = tuple(at[n] for n in ROLLUP_COUNTERS[2:])
    totals: dict[tuple[int, str, str, str], list[int]] = {}
    for row in rows:
        occurred = row[occurred_i]
        key = (occurred - occurred % HOUR_MS, row[key_i], row[user_i], row[model_i])
        counters = totals.get(key)
        if counters is None:
            counters = totals[key] = [0] * len(ROLLUP_COUNTERS)
        # requests, failed_requests, then the summed columns, as in ROLLUP_COUNTERS.
        requests = max(1, row[aggregated_i])
        counters[0] += requests
        counters[1] += requests if row[status_i] >= 400 else 0
        for slot, index in enumerate(summed, start=2):
            counters[slot] += row[index]
    return [
        {**dict(zip(ROLLUP_KEY, key, strict=True)), **dict(zip(ROLLUP_COUNTERS, counters, strict=True))}
        for key, counters in sorted(totals.items())
    ]


_SQLITE_INSERT = (
    sqlite.insert(_TABLE)
    .on_conflict_do_nothing(index_elements=["occurred_at_ms", "event_id"])
    .returning(_TABLE.c.occurred_at_ms, _TABLE.c.event_id)
)


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


async def _insert_postgresql(session: AsyncSession, rows: list[tuple[Any, ...]]) -> list[tuple[int, str]]:
    connection = await session.connection()
    # Through SQLAlchemy first, so that its transaction has begun before the driver is used directly.
    await connection.exec_driver_sql(_CREATE_STAGE)
    driver: Any = (await connection.get_raw_connection()).driver_connection
    await driver.copy_records_to_table(_STAGE, records=rows, columns=COLUMNS)
    stored: list[Any] = list(await connection.exec_driver_sql(_MOVE_STAGED))
    return [(int(row[0]), str(row[1])) for row in stored]


async def _insert_sqlite(session: AsyncSession, rows: list[tuple[Any, ...]]) -> list[tuple[int, str]]:
    params = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
    stored: list[Any] = list(await session.execute(_SQLITE_INSERT, params))
    return [(int(row[0]), str(row[1])) for row in stored]


_INSERTS = {"postgresql": _insert_postgresql, "sqlite": _insert_sqlite}


async def write(db: Database, events: Sequence[UsageEvent], *, clock: Clock = _SYSTEM_CLOCK) -> int:
    """Store ``events`` and their rollups in one transaction on the primary; return how many rows were new.

    Events already stored are skipped, and add nothing to the rollups, so writing the same batch twice
    is safe. Either everything is committed or nothing is (the exception propagates).
    """
    if not events:
        return 0
    rows = _rows(events, int(clock.time() * 1000))
    insert = _INSERTS.get(db.dialect)
    if insert is None:
        raise ValueError(f"no idempotent insert for the {db.dialect!r} dialect")
    async with db.transaction() as session:
        stored = await insert(session, rows)
        if len(stored) == len(rows):
            new_rows = rows
        else:
            keys = set(stored)
            occurred_i, event_i = _AT["occurred_at_ms"], _AT["event_id"]
            new_rows = [row for row in rows if (row[occurred_i], row[event_i]) in keys]
        if new_rows:
            await session.execute(_rollup_statement(db.dialect), rollups(new_rows))
    METRICS.logger_rows.labels(result="inserted").inc(len(new_rows))
    METRICS.logger_rows.labels(result="duplicate").inc(len(events) - len(new_rows))
    spend: dict[str, int] = {}
    model_i, cost_i = _AT["model"], _AT["cost_micros"]
    for row in new_rows:
        if row[cost_i] > 0:
            spend[row[model_i]] = spend.get(row[model_i], 0) + row[cost_i]
    for model, micros in spend.items():
        METRICS.logger_spend_micros.labels(model=model).inc(micros)
    return len(new_rows)
