"""Daily partitions of ``request_logs``: created ahead of time, and dropped whole once past retention.

On PostgreSQL ``request_logs`` is partitioned by range of ``occurred_at_ms``, one partition per UTC day
(``request_logs_pYYYYMMDD``), plus ``request_logs_default``, which takes any row no day partition
covers, so an insert never fails for lack of a partition. Each maintenance pass:

- **creates** the partitions from yesterday to ``days_ahead`` days after today that are missing. Rows
  that reached the default partition for such a day (the logger was down longer than ``days_ahead``, or
  an event came from a skewed clock) are moved into the new partition in the same transaction;
- **drops** every partition whose whole range ends on or before the retention cutoff (the start of
  today, UTC, minus ``retention_days``), and deletes default-partition rows older than the cutoff. A
  partition holding anything newer than the cutoff is never touched. ``retention_days=0`` keeps
  everything.

Every DDL statement runs in its own short transaction, under a ``lock_timeout`` and a transaction-level
advisory lock. The timeout matters: DDL on a partitioned table needs an ACCESS EXCLUSIVE lock on it, and a
DDL statement waiting behind a long query would make every insert queue behind *it*; giving up and
trying again at the next pass is harmless because partitions exist days ahead. The advisory lock lets
several logger processes run maintenance without racing on the same ``CREATE TABLE``.

SQLite (the embedded default) keeps a plain table: retention is a ``DELETE`` in chunks, and there is
nothing to create.

Rollups (``usage_hourly``) are not touched: they keep the totals of dropped days.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.clock import Clock, SystemClock
from services.common.db import Database
from services.common.telemetry import METRICS
from services.logger.models import DAY_MS

log = logging.getLogger(__name__)

PARENT = "request_logs"
DEFAULT_PARTITION = "request_logs_default"
# How long a DDL statement may wait for its lock before the pass gives up (see the module docstring).
_LOCK_TIMEOUT = "2s"
# Serializes maintenance across logger processes (pg_advisory_xact_lock key; "rglogprt" in ASCII).
_ADVISORY_LOCK_KEY = 0x72676C6F67707274
# SQLite retention deletes in chunks, so that the write lock is never held for long.
_SQLITE_DELETE_CHUNK = 10_000
# After a failed pass, the next one comes sooner than the regular interval.
_RETRY_AFTER_FAILURE_S = 60.0

_BOUND = re.compile(r"FOR VALUES FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


@dataclass(frozen=True)
class PartitionPolicy:
    """How far ahead partitions exist, and how long logs are kept (0 days: forever)."""

    days_ahead: int = 7
    retention_days: int = 0

    def __post_init__(self) -> None:
        if self.days_ahead < 1:
            raise ValueError(f"days_ahead must be at least 1, got {self.days_ahead}")
        if self.retention_days < 0:
            raise ValueError(f"retention_days must not be negative, got {self.retention_days}")


@dataclass(frozen=True, order=True)
class Partition:
    """One day partition: rows with ``from_ms <= occurred_at_ms < to_ms``."""

    from_ms: int
    to_ms: int
    name: str


@dataclass(frozen=True)
class MaintenanceResult:
    created: list[str]
    dropped: list[str]
    # Rows deleted by retention outside dropped partitions (the default partition, or SQLite's table).
    deleted_rows: int


def day_start_ms(millis: int) -> int:
    return millis - millis % DAY_MS


def partition_name(day_ms: int) -> str:
    """``request_logs_pYYYYMMDD`` for the UTC day starting at ``day_ms``."""
    day = datetime.datetime.fromtimestamp(day_ms / 1000, datetime.UTC)
    return f"{PARENT}_p{day:%Y%m%d}"


def retention_cutoff_ms(now_ms: int, retention_days: int) -> int:
    """Rows older than this are past retention: the start of today (UTC) minus ``retention_days``."""
    return day_start_ms(now_ms) - retention_days * DAY_MS


async def list_partitions(db: Database) -> list[Partition]:
    """The range partitions of ``request_logs``, oldest first (PostgreSQL; the default one excluded)."""
    if db.is_sqlite:
        return []
    async with db.writer() as session:
        return await _partitions(session)


async def _partitions(session: AsyncSession) -> list[Partition]:
    rows = await session.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": PARENT},
    )
    found: list[Partition] = []
    for name, bound in rows:
        match = _BOUND.search(bound or "")
        if match is not None:
            found.append(Partition(int(match[1]), int(match[2]), name))
    return sorted(found)


async def maintain(db: Database, policy: PartitionPolicy, *, now_ms: int) -> MaintenanceResult:
    """One maintenance pass as of ``now_ms``; see the module docstring. Raises on database errors."""
    if db.is_sqlite:
        deleted = await _sqlite_retention(db, policy, now_ms) if policy.retention_days else 0
        return MaintenanceResult([], [], deleted)
    created = await _create_ahead(db, policy, now_ms)
    dropped: list[str] = []
    deleted = 0
    if policy.retention_days:
        dropped, deleted = await _drop_expired(db, retention_cutoff_ms(now_ms, policy.retention_days))
    return MaintenanceResult(created, dropped, deleted)


async def _begin_ddl(session: AsyncSession) -> None:
    await session.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
    await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})


async def _create_ahead(db: Database, policy: PartitionPolicy, now_ms: int) -> list[str]:
    today = day_start_ms(now_ms)
    wanted = [today + offset * DAY_MS for offset in range(-1, policy.days_ahead + 1)]
    existing = {(p.from_ms, p.to_ms) for p in await list_partitions(db)}
    created: list[str] = []
    for day in wanted:
        if (day, day + DAY_MS) in existing:
            continue
        async with db.transaction() as session:
            await _begin_ddl(session)
            if await _create_partition(session, day):
                created.append(partition_name(day))
    return created


async def _create_partition(session: AsyncSession, day: int) -> bool:
    """Create the partition of ``day`` unless it exists (another process may have made it); True if made."""
    name = partition_name(day)
    if any(p.from_ms == day for p in await _partitions(session)):
        return False
    # Taken first and explicitly: the creation needs it anyway, and holding it while we look at the
    # default partition means no insert can put a row there between the look and the creation.
    await session.execute(text(f"LOCK TABLE {PARENT} IN ACCESS EXCLUSIVE MODE"))
    bounds = {"lo": day, "hi": day + DAY_MS}
    in_default = await session.scalar(
        text(
            f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE occurred_at_ms >= :lo AND occurred_at_ms < :hi"
        ),
        bounds,
    )
    if in_default:
        # PostgreSQL refuses to create a partition for rows the default partition holds: move them out
        # and back in through the parent, within this transaction.
        await session.execute(text(f"CREATE TEMPORARY TABLE moving (LIKE {PARENT}) ON COMMIT DROP"))
        await session.execute(
            text(
                f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE occurred_at_ms >= :lo "
                "AND occurred_at_ms < :hi RETURNING *) INSERT INTO moving SELECT * FROM moved"
            ),
            bounds,
        )
    await session.execute(
        text(f"CREATE TABLE {name} PARTITION OF {PARENT} FOR VALUES FROM ({day}) TO ({day + DAY_MS})")
    )
    if in_default:
        await session.execute(text(f"INSERT INTO {PARENT} SELECT * FROM moving"))
    METRICS.logger_partitions.labels(action="created").inc()
    log.info("partition created", extra={"partition": name, "moved_from_default": int(in_default or 0)})
    return True


async def _drop_expired(db: Database, cutoff_ms: int) -> tuple[list[str], int]:
    dropped: list[str] = []
    for partition in await list_partitions(db):
        if partition.to_ms > cutoff_ms:
            continue
        async with db.transaction() as session:
            await _begin_ddl(session)
            # Under the advisory lock: another logger may have dropped it since the listing.
            if not await session.scalar(
                text("SELECT to_regclass(:name) IS NOT NULL"), {"name": partition.name}
            ):
                continue
            await session.execute(text(f"DROP TABLE {partition.name}"))
        dropped.append(partition.name)
        METRICS.logger_partitions.labels(action="dropped").inc()
        log.info("partition dropped by retention", extra={"partition": partition.name})
    async with db.transaction() as session:
        await session.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
        result = await session.execute(
            text(f"DELETE FROM {DEFAULT_PARTITION} WHERE occurred_at_ms < :cutoff"), {"cutoff": cutoff_ms}
        )
        deleted = int(getattr(result, "rowcount", 0) or 0)
    return dropped, deleted


async def _sqlite_retention(db: Database, policy: PartitionPolicy, now_ms: int) -> int:
    cutoff = retention_cutoff_ms(now_ms, policy.retention_days)
    deleted = 0
    while True:
        async with db.transaction() as session:
            result = await session.execute(
                text(
                    f"DELETE FROM {PARENT} WHERE rowid IN (SELECT rowid FROM {PARENT} "
                    "WHERE occurred_at_ms < :cutoff LIMIT :chunk)"
                ),
                {"cutoff": cutoff, "chunk": _SQLITE_DELETE_CHUNK},
            )
        count = int(getattr(result, "rowcount", 0) or 0)
        deleted += count
        if count < _SQLITE_DELETE_CHUNK:
            return deleted


class PartitionMaintenance:
    """Runs :func:`maintain` at start and then every ``interval_s`` until stopped; never raises.

    A failed pass is logged and counted, and retried after a minute; partitions exist ``days_ahead``
    days in advance precisely so that a failing pass costs nothing for a while.
    """

    def __init__(
        self,
        db: Database,
        policy: PartitionPolicy,
        *,
        interval_s: float,
        clock: Clock | None = None,
    ) -> None:
        self._db = db
        self._policy = policy
        self._interval_s = interval_s
        self._clock = clock or SystemClock()

    async def run_once(self) -> MaintenanceResult | None:
        """One pass; None when it failed (already logged)."""
        try:
            result = await maintain(self._db, self._policy, now_ms=int(self._clock.time() * 1000))
            if result.created or result.dropped or result.deleted_rows:
                log.info(
                    "partition maintenance",
                    extra={
                        "partitions_created": result.created,
                        "partitions_dropped": result.dropped,
                        "deleted_rows": result.deleted_rows,
                    },
                )
        except Exception:
            # Whatever went wrong, the task must live on: the next pass may well succeed.
            METRICS.logger_maintenance_failures.inc()
            log.warning("partition maintenance failed; retrying later", exc_info=True)
            return None
        return result

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            result = await self.run_once()
            wait = self._interval_s if result is not None else min(self._interval_s, _RETRY_AFTER_FAILURE_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
