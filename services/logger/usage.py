"""Usage summaries: totals per hour or UTC day, optionally per key, user and model, from the rollups.

Summaries read ``usage_hourly`` (one row per hour, key, user and model, kept by the writer), never the
request logs, so their cost grows with the number of keys and hours asked for, not with traffic. They
read a replica (``db.reader()``): a batch shows up there a few milliseconds after the logger commits it.

The rollups' resolution is one hour, so the requested range is widened to whole hours (``since_ms``
down, ``until_ms`` up) and the effective range is returned. A day bucket at either end of the range
covers only the hours inside it. Pages are ordered by bucket, then by the grouped dimensions, and the
cursor is the last row's group key: paging stays cheap however far it goes, and a client must repeat
the same request with it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import BigInteger, ColumnElement, String, bindparam, func, select, tuple_

from services.common.db import Database
from services.common.errors import InvalidRequest
from services.logger.models import DAY_MS, HOUR_MS, ROLLUP_COUNTERS, UsageHourly

Dimension = Literal["key_id", "user_id", "model"]
Granularity = Literal["hour", "day"]

# The order dimensions appear in rows, cursors and ORDER BY, whatever order they were asked in.
DIMENSIONS: tuple[Dimension, ...] = ("key_id", "user_id", "model")
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_MAX_MS = 2**63 - 1


@dataclass(frozen=True)
class UsageQuery:
    """One summary request; empty strings and zeros mean "any" / "open"."""

    group_by: frozenset[Dimension] = frozenset()
    granularity: Granularity = "hour"
    key_id: str = ""
    user_id: str = ""
    model: str = ""
    # Unix milliseconds: since inclusive, until exclusive.
    since_ms: int = 0
    until_ms: int = 0
    # 0 means DEFAULT_LIMIT; larger than MAX_LIMIT is capped to it.
    limit: int = 0
    cursor: str = ""


@dataclass(frozen=True)
class UsageRow:
    """Totals of one bucket; a dimension not grouped by is empty."""

    bucket_start_ms: int
    key_id: str = ""
    user_id: str = ""
    model: str = ""
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UsagePage:
    rows: list[UsageRow]
    # Pass back to get the next page; empty on the last one.
    next_cursor: str
    # The range summarized, widened to whole hours (0 = open).
    since_ms: int
    until_ms: int


def widen(since_ms: int, until_ms: int) -> tuple[int, int]:
    """The smallest whole-hour range containing ``[since_ms, until_ms)``; 0 stays open."""
    since = since_ms - since_ms % HOUR_MS
    until = until_ms if until_ms % HOUR_MS == 0 else until_ms - until_ms % HOUR_MS + HOUR_MS
    return since, until


def _encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, dimensions: tuple[Dimension, ...]) -> tuple[int, list[str]]:
    """The group key a cursor points after; raises :class:`InvalidRequest` for anything else."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, list) or len(key) != 1 + len(dimensions):
            raise ValueError(key)
        bucket, *values = key
        if type(bucket) is not int or not 0 <= bucket <= _MAX_MS:
            raise ValueError(bucket)
        if not all(isinstance(value, str) for value in values):
            raise ValueError(values)
    except ValueError as exc:  # also binascii.Error, UnicodeDecodeError and json's JSONDecodeError
        raise InvalidRequest(
            "cursor is not one returned by this API for this request", param="cursor"
        ) from exc
    return bucket, values


def _check(query: UsageQuery) -> None:
    if query.limit < 0:
        raise InvalidRequest("limit must not be negative", param="limit")
    if query.granularity not in ("hour", "day"):
        raise InvalidRequest(f"unknown granularity {query.granularity!r}", param="granularity")
    unknown = sorted(set(query.group_by) - set(DIMENSIONS))
    if unknown:
        raise InvalidRequest(f"cannot group usage by {unknown}", param="group_by")
    # An hour of headroom, so that widening until_ms up to the next hour cannot overflow.
    for name in ("since_ms", "until_ms"):
        if not 0 <= getattr(query, name) <= _MAX_MS - HOUR_MS:
            raise InvalidRequest(f"{name} must be unix milliseconds", param=name)
    if query.since_ms and query.until_ms and query.until_ms <= query.since_ms:
        raise InvalidRequest("until_ms must be after since_ms", param="until_ms")


async def summarize_usage(db: Database, query: UsageQuery) -> UsagePage:
    """One page of usage buckets matching ``query``, oldest first."""
    _check(query)
    limit = min(query.limit or DEFAULT_LIMIT, MAX_LIMIT)
    since, until = widen(query.since_ms, query.until_ms)
    dimensions = tuple(d for d in DIMENSIONS if d in query.group_by)
    table = UsageHourly.__table__.c
    bucket: ColumnElement[int] = (
        table.hour_ms if query.granularity == "hour" else table.hour_ms - table.hour_ms % DAY_MS
    )
    group: list[ColumnElement[Any]] = [bucket, *(table[d] for d in dimensions)]
    statement = select(
        bucket.label("bucket"),
        *(table[d] for d in dimensions),
        *(func.sum(table[name]).label(name) for name in ROLLUP_COUNTERS),
    )
    for name in DIMENSIONS:
        value = getattr(query, name)
        if value:
            statement = statement.where(table[name] == value)
    if since:
        statement = statement.where(table.hour_ms >= since)
    if until:
        statement = statement.where(table.hour_ms < until)
    if query.cursor:
        after_bucket, after_values = _decode_cursor(query.cursor, dimensions)
        after: list[ColumnElement[Any]] = [bindparam("after_bucket", after_bucket, type_=BigInteger)]
        after += [
            bindparam(f"after_{d}", v, type_=String) for d, v in zip(dimensions, after_values, strict=True)
        ]
        # Compared before grouping: every group column is a function of the row alone.
        statement = statement.where(tuple_(*group) > tuple_(*after))
    statement = statement.group_by(*group).order_by(*group).limit(limit + 1)
    async with db.reader() as session:
        result = list(await session.execute(statement))
    rows = [
        UsageRow(
            bucket_start_ms=int(row.bucket),
            **{d: str(getattr(row, d)) for d in dimensions},
            counters={name: int(getattr(row, name) or 0) for name in ROLLUP_COUNTERS},
        )
        for row in result[:limit]
    ]
    next_cursor = ""
    if len(result) > limit:
        last = rows[-1]
        next_cursor = _encode_cursor([last.bucket_start_ms, *(getattr(last, d) for d in dimensions)])
    return UsagePage(rows, next_cursor, since, until)
