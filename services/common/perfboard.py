"""Where each process posts its performance snapshot, and where the performance view reads them all.

Every second or so a process writes a compact JSON snapshot under its own Redis key with a short TTL and
adds the key to one set; the reader takes the set's members, fetches them in one MGET, and forgets the
members whose key expired (a process that stopped). Without Redis the board is the process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from prometheus_client.metrics import MetricWrapperBase
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.rolling import Rolling
from services.common.tasks import cancel_and_wait
from services.common.telemetry import METRICS

log = logging.getLogger(__name__)

_MEMBERS = "relaygate:perf:members"
_PREFIX = "relaygate:perf:"
# A snapshot outlives a few missed posts, not a stopped process.
TTL_S = 5
INTERVAL_S = 1.0
# How long a process on its way out tries to take itself off the board.
FORGET_S = 0.5


def instance_name(service: str) -> str:
    """A name for this process that no other process of any host shares."""
    return f"{service}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def totals(collector: MetricWrapperBase, label: str | None = None) -> dict[str, float]:
    """The cumulative value of ``collector`` (a counter or a gauge) per value of ``label`` ("" = all).

    Read through ``collect()``, the exposition path, so nothing on the recording side changes."""
    found: dict[str, float] = {}
    for family in collector.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = sample.labels.get(label, "") if label else ""
            found[key] = found.get(key, 0.0) + sample.value
    return found


def labelled(collector: MetricWrapperBase) -> list[tuple[dict[str, str], float]]:
    """Every child of a gauge with its labels."""
    return [
        (dict(sample.labels), sample.value)
        for family in collector.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


class Board:
    """Posts this process's snapshot every ``INTERVAL_S`` and reads everyone's."""

    def __init__(self, redis: Redis | None, instance: str, build: Callable[[], dict[str, Any]]) -> None:
        self._redis = redis
        self._key = _PREFIX + instance
        self._build = build
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="perf-board")

    async def close(self) -> None:
        """Stop posting and take this process off the board: one round trip, given ``FORGET_S`` (the
        snapshot expires by itself anyway), so a Redis that stopped answering does not hold a process
        on its way out."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(FORGET_S), self._redis.pipeline(transaction=False) as pipe:
                    pipe.srem(_MEMBERS, self._key)
                    pipe.delete(self._key)
                    await pipe.execute()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                snapshot = self._build()
                if self._redis is not None:
                    await self._post(snapshot)
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("performance snapshot not posted", extra={"error": str(exc)})
                failing = True
            await asyncio.sleep(INTERVAL_S)

    async def _post(self, snapshot: dict[str, Any]) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key, orjson.dumps(snapshot), ex=TTL_S)
            pipe.sadd(_MEMBERS, self._key)
            await pipe.execute()

    async def read(self) -> list[dict[str, Any]]:
        """Every live snapshot; this process's own is built fresh (and is the only one without Redis)."""
        own = self._build()
        if self._redis is None:
            return [own]
        try:
            return [own, *await self._others()]
        except (RedisError, OSError) as exc:
            # This relay's own figures still answer; ``sources`` in the view shows who was heard.
            log.warning("performance snapshots of other processes unreadable", extra={"error": str(exc)})
            return [own]

    async def _others(self) -> list[dict[str, Any]]:
        assert self._redis is not None
        members = await self._redis.smembers(_MEMBERS)
        names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        others = [m for m in names if m != self._key]
        if not others:
            return []
        values = await self._redis.mget(others)
        gone = [m for m, v in zip(others, values, strict=True) if v is None]
        if gone:
            await self._redis.srem(_MEMBERS, *gone)
        return [orjson.loads(v) for v in values if v is not None]


def sum_counters(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            merged[name] = merged.get(name, 0.0) + value
    return merged


class CounterFeed:
    """Turns cumulative series into windowed counts: each sample adds what grew since the last one."""

    def __init__(self, rolling: Rolling, read: Callable[[], dict[str, float]]) -> None:
        self._rolling = rolling
        self._read = read
        self._last = read()

    def sample(self) -> None:
        current = self._read()
        for name, value in current.items():
            grown = value - self._last.get(name, 0.0)
            if grown > 0:
                self._rolling.add(name, grown)
        self._last = current


def histogram_totals(collector: MetricWrapperBase) -> tuple[float, float]:
    """(count, sum) over every child of a Prometheus histogram."""
    count = total = 0.0
    for family in collector.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


def service_counters() -> dict[str, float]:
    """The cumulative counts a logger, quota or auth process posts (series it does not touch read 0)."""
    found: dict[str, float] = {}
    for target, n in totals(METRICS.db_reads, "target").items():
        found[f"db_reads.{target}"] = n
    count, seconds = histogram_totals(METRICS.logger_batch_write)
    found["logger.batches"] = count
    found["logger.batch_seconds"] = seconds
    found["logger.rows"] = sum(totals(METRICS.logger_rows).values())
    return found


class ServiceSnapshot:
    """The snapshot of a logger, quota or auth process: replica routing and lag, logger lag and batches."""

    def __init__(self, service: str, instance: str) -> None:
        self.service = service
        self.instance = instance
        self._rolling = Rolling()
        self._feed = CounterFeed(self._rolling, service_counters)

    def __call__(self) -> dict[str, Any]:
        self._feed.sample()
        return {
            "service": self.service,
            "instance": self.instance,
            "at_ms": int(time.time() * 1000),
            "windows": self._rolling.snapshot(),
            "now": {
                "logger_lag": sum(totals(METRICS.logger_consumer_lag).values()),
                "logger_paused": totals(METRICS.logger_paused).get("", 0.0),
                "replicas": {labels["replica"]: v for labels, v in labelled(METRICS.db_replica_lag_bytes)},
                "replicas_healthy": {
                    labels["replica"]: v for labels, v in labelled(METRICS.db_replica_healthy)
                },
            },
        }


def service_board(redis: Redis, service: str) -> Board:
    """A started board posting this logger, quota or auth process's snapshot (close it on the way out)."""
    snapshot = ServiceSnapshot(service, instance_name(service))
    board = Board(redis, snapshot.instance, snapshot)
    board.start()
    return board
