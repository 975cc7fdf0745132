"""Reading request logs: filtered, newest first, paginated by keyset, from a read replica.

Pages are ordered by the primary key ``(occurred_at_ms, event_id)`` descending, and the cursor is that
key of a page's last row, so paging costs the same on page one thousand as on page one and rows written
while a client pages never shift or repeat what it sees. The cursor is opaque to clients (base64 of the
key); nothing binds it to the filters, so a client must repeat the same filters with it.

Reads go to a replica (``db.reader()``): a row becomes visible there a few milliseconds after the logger
commits it, and log listings do not need read-your-own-write.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import get_args

from sqlalchemy import BigInteger, String, bindparam, select, tuple_

from services.common.db import Database
from services.common.errors import Fault, InvalidRequest
from services.logger.models import RequestLog

FAULTS: tuple[str, ...] = get_args(Fault)

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
_MAX_MS = 2**63 - 1


@dataclass(frozen=True)
class LogQuery:
    """Filters of one listing; empty strings and zeros mean "any"."""

    key_id: str = ""
    user_id: str = ""
    model: str = ""
    status_code: int = 0
    # A fault class (services.common.errors.Fault): only the failures that were its fault.
    error_type: str = ""
    # Unix milliseconds: since inclusive, until exclusive.
    since_ms: int = 0
    until_ms: int = 0
    # 0 means DEFAULT_LIMIT; larger than MAX_LIMIT is capped to it.
    limit: int = 0
    cursor: str = ""


@dataclass(frozen=True)
class LogPage:
    rows: list[RequestLog]
    # Pass back to get the next page; empty on the last one.
    next_cursor: str


def encode_cursor(occurred_at_ms: int, event_id: str) -> str:
    raw = f"{occurred_at_ms}:{event_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The key a cursor points after; raises :class:`InvalidRequest` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        millis, sep, event_id = raw.partition(":")
        occurred_at_ms = int(millis)
        if not sep or not event_id or not millis.isdigit() or occurred_at_ms > _MAX_MS:
            raise ValueError(raw)
    except ValueError as exc:  # also binascii.Error and UnicodeDecodeError
        raise InvalidRequest("cursor is not one returned by this API", param="cursor") from exc
    return occurred_at_ms, event_id


def _check(query: LogQuery) -> None:
    if query.limit < 0:
        raise InvalidRequest("limit must not be negative", param="limit")
    if query.status_code < 0:
        raise InvalidRequest("status_code must not be negative", param="status_code")
    if query.error_type and query.error_type not in FAULTS:
        raise InvalidRequest(f"error_type is one of {', '.join(FAULTS)}", param="error_type")
    for name in ("since_ms", "until_ms"):
        if not 0 <= getattr(query, name) <= _MAX_MS:
            raise InvalidRequest(f"{name} must be unix milliseconds", param=name)
    if query.since_ms and query.until_ms and query.until_ms <= query.since_ms:
        raise InvalidRequest("until_ms must be after since_ms", param="until_ms")


async def list_request_logs(db: Database, query: LogQuery) -> LogPage:
    """One page of logs matching ``query``, newest first."""
    _check(query)
    limit = min(query.limit or DEFAULT_LIMIT, MAX_LIMIT)
    statement = select(RequestLog)
    if query.key_id:
        statement = statement.where(RequestLog.key_id == query.key_id)
    if query.user_id:
        statement = statement.where(RequestLog.user_id == query.user_id)
    if query.model:
        statement = statement.where(RequestLog.model == query.model)
    if query.status_code:
        statement = statement.where(RequestLog.status_code == query.status_code)
    if query.error_type:
        statement = statement.where(RequestLog.error_type == query.error_type)
    if query.since_ms:
        statement = statement.where(RequestLog.occurred_at_ms >= query.since_ms)
    if query.until_ms:
        statement = statement.where(RequestLog.occurred_at_ms < query.until_ms)
    if query.cursor:
        after_ms, after_id = decode_cursor(query.cursor)
        # A row comparison: PostgreSQL turns it into one range condition on the primary key index.
        statement = statement.where(
            tuple_(RequestLog.occurred_at_ms, RequestLog.event_id)
            < tuple_(
                bindparam("after_ms", after_ms, type_=BigInteger),
                bindparam("after_id", after_id, type_=String),
            )
        )
    statement = statement.order_by(RequestLog.occurred_at_ms.desc(), RequestLog.event_id.desc()).limit(
        limit + 1
    )
    async with db.reader() as session:
        rows = list((await session.scalars(statement)).all())
    if len(rows) <= limit:
        return LogPage(rows, "")
    last = rows[limit - 1]
    return LogPage(rows[:limit], encode_cursor(last.occurred_at_ms, last.event_id))
