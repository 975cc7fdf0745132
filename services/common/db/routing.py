"""Primary/replica routing, chosen per operation.

``db.writer()`` is a session on the primary. ``db.reader()`` is a session on a healthy replica, or on
the primary when there is none; ``db.reader(consistent=True)`` is for reads that must see the caller's
own write and always uses the primary. A background check skips replicas that are down or further
behind than ``replica_max_lag_bytes`` and logs each switch. SQLite (the embedded default) has no
replicas; its writer sessions start with ``BEGIN IMMEDIATE`` so that concurrent writers from several
processes queue on the lock instead of failing on upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.common.config import DatabaseSettings
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS

log = logging.getLogger(__name__)


@dataclass
class ReplicaState:
    url: str
    engine: AsyncEngine
    healthy: bool = False
    lag_bytes: int | None = None
    error: str = ""

    @property
    def name(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


@dataclass
class _Routing:
    replicas: list[ReplicaState] = field(default_factory=list)


def _sqlite_engine(url: str, *, begin: str) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below (the driver's own is unreliable).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


class Database:
    """The process's database engines; created once, closed by the owner's lifespan."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.is_sqlite = settings.database_url.startswith("sqlite")
        if self.is_sqlite:
            self.primary = _sqlite_engine(settings.database_url, begin="BEGIN IMMEDIATE")
            self._sqlite_reader = _sqlite_engine(settings.database_url, begin="BEGIN")
        else:
            self.primary = self._pg_engine(settings.database_url)
        self._routing = _Routing(
            [ReplicaState(url, self._pg_engine(url)) for url in settings.database_replica_urls]
        )
        self._writer = async_sessionmaker(self.primary, expire_on_commit=False)
        self._readers = {
            id(r.engine): async_sessionmaker(r.engine, expire_on_commit=False) for r in self._routing.replicas
        }
        self._primary_reader = async_sessionmaker(
            self._sqlite_reader if self.is_sqlite else self.primary, expire_on_commit=False
        )
        self._monitor: asyncio.Task[None] | None = None

    def _pg_engine(self, url: str) -> AsyncEngine:
        return create_async_engine(
            url,
            pool_size=self.settings.database_pool_size,
            max_overflow=self.settings.database_max_overflow,
            pool_pre_ping=True,
        )

    @property
    def dialect(self) -> str:
        return self.primary.dialect.name

    @property
    def replicas(self) -> list[ReplicaState]:
        return list(self._routing.replicas)

    async def start(self) -> None:
        """Check replicas once, then keep checking them in the background."""
        if self._routing.replicas:
            await self.check_replicas()
            self._monitor = asyncio.create_task(self._monitor_replicas(), name="replica-monitor")
        log.info("database routing", extra={"routing": self.routing_status()})

    async def close(self) -> None:
        if self._monitor is not None:
            await cancel_and_wait(self._monitor)
        for replica in self._routing.replicas:
            await replica.engine.dispose()
        if self.is_sqlite:
            await self._sqlite_reader.dispose()
        await self.primary.dispose()

    def routing_status(self) -> dict[str, object]:
        """The effective routing, for startup logs and status endpoints."""
        return {
            "primary": self.primary.url.render_as_string(hide_password=True),
            "replicas": [
                {"url": r.name, "healthy": r.healthy, "lag_bytes": r.lag_bytes, "error": r.error}
                for r in self._routing.replicas
            ],
        }

    def writer(self) -> AsyncSession:
        """A session on the primary, for writes and read-your-own-write reads."""
        return self._writer()

    def reader(self, *, consistent: bool = False) -> AsyncSession:
        """A session for reads: a healthy replica unless ``consistent`` asks for the primary."""
        if not consistent:
            healthy = [r for r in self._routing.replicas if r.healthy]
            if healthy:
                METRICS.db_reads.labels(target="replica").inc()
                return self._readers[id(random.choice(healthy).engine)]()
        METRICS.db_reads.labels(target="primary").inc()
        return self._primary_reader()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A writer session inside one transaction, committed on success."""
        async with self.writer() as session, session.begin():
            yield session

    async def primary_lsn(self) -> int | None:
        """The primary's current WAL position (PostgreSQL only), taken after a commit."""
        if self.is_sqlite:
            return None
        async with self.primary.connect() as conn:
            value = await conn.scalar(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
        return int(value)

    async def check_replicas(self) -> None:
        primary_lsn = await self.primary_lsn() if self._routing.replicas else None
        for replica in self._routing.replicas:
            await self._check_replica(replica, primary_lsn)

    async def _check_replica(self, replica: ReplicaState, primary_lsn: int | None) -> None:
        was_healthy = replica.healthy
        try:
            async with replica.engine.connect() as conn:
                replayed = await asyncio.wait_for(
                    conn.scalar(text("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")), timeout=2.0
                )
            lag = (
                max(0, primary_lsn - int(replayed)) if primary_lsn is not None and replayed is not None else 0
            )
            replica.lag_bytes = lag
            replica.healthy = lag <= self.settings.replica_max_lag_bytes
            replica.error = "" if replica.healthy else f"lagging {lag} bytes"
        except Exception as exc:  # any failure means "do not route reads here"
            replica.healthy = False
            replica.lag_bytes = None
            replica.error = f"{type(exc).__name__}: {exc}"[:200]
        METRICS.db_replica_healthy.labels(replica=replica.name).set(1 if replica.healthy else 0)
        if replica.lag_bytes is not None:
            METRICS.db_replica_lag_bytes.labels(replica=replica.name).set(replica.lag_bytes)
        if was_healthy != replica.healthy:
            level = logging.INFO if replica.healthy else logging.WARNING
            state = "healthy: routing reads to it" if replica.healthy else "unhealthy: reads go elsewhere"
            log.log(level, "replica %s %s", replica.name, state, extra={"error": replica.error})

    async def _monitor_replicas(self) -> None:
        while True:
            await asyncio.sleep(self.settings.replica_check_interval_s)
            try:
                await self.check_replicas()
            except Exception:
                # The primary itself is unreachable; keep the last known replica states.
                log.warning("replica check failed", exc_info=True)

    async def wait_replica_caught_up(self, lsn: int, *, timeout: float = 1.0) -> bool:
        """Wait until every healthy replica has replayed ``lsn``; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        for replica in self._routing.replicas:
            if not replica.healthy:
                continue
            while True:
                async with replica.engine.connect() as conn:
                    replayed = await conn.scalar(text("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn"))
                if replayed is not None and int(replayed) >= lsn:
                    break
                if asyncio.get_running_loop().time() >= deadline:
                    return False
                await asyncio.sleep(0.002)
        return True
