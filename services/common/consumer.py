"""A Kafka group consumer that writes batches and commits offsets only after the write is durable.

Every consumer of the usage topic (the logger's request logs, quota's settlement) is one subclass of
:class:`BatchConsumer`: it says what a message becomes (:meth:`BatchConsumer._take`) and how a batch is
stored (:meth:`BatchConsumer._write`); the loop, the offsets and the failure handling are here, once::

    getmany() ──▶ _take(record) ──▶ Batch ──(closed by size or age)──▶ _write(items) ──▶ commit(offsets)
                      │ None (nothing to store)
                      └──▶ offset committed with the batch

Delivery is at least once, so ``_write`` must be idempotent (a replay after a crash or a rebalance
stores nothing twice). Offsets are committed only after ``_write`` returned, and only up to what the
batch holds.

- **Write fails** (database down): the batch is kept, every assigned partition is paused (the fetcher
  stops reading, memory stays bounded) and the write is retried with exponential backoff; polling goes
  on meanwhile so the group does not evict the consumer. A success resumes the partitions.
- **Rebalance**: before partitions are given up, the batch is written and committed. If that fails the
  batch is dropped uncommitted, and the partitions' next owner re-reads it.
- **Stop**: the batch is written and committed (retried for ``shutdown_timeout_s``); what still fails
  stays uncommitted and is redelivered later. Nothing is ever skipped.

Lag (the ``lag`` gauge of :class:`~services.common.telemetry.ConsumerMetrics`, per partition) is the
partition's highwater minus the offset this consumer last committed. The highwater comes from fetch
responses (``consumer.highwater``), not from ``ListOffsets`` (no extra request per partition): so
while partitions are paused the figure is the one from the last fetch, and the ``paused`` gauge says
why it stopped moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import TopicPartition

from services.common import tracing
from services.common.batch import Batch, BatchPolicy
from services.common.clock import Clock, SystemClock
from services.common.config import KafkaConsumerSettings
from services.common.telemetry import ConsumerMetrics

__all__ = ["BatchConsumer", "Stopped", "group_consumer"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# Longest single wait for records: bounds how long a stop request or a closing batch goes unnoticed.
_MAX_POLL_WAIT_S = 0.25
# Backoff between attempts at writing a batch.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
# Bound on one offset commit (see _flush).
_COMMIT_TIMEOUT_S = 2.0
# How long the broker may hold a fetch that has no data yet. Kafka answers a held fetch as soon as a
# record arrives, so this costs no latency; it only sets how many empty fetches an idle consumer makes
# (two a second: each costs this process and the broker CPU, which an idle deployment pays forever).
_FETCH_MAX_WAIT_MS = 500
# The lag gauge is refreshed at most this often.
_LAG_INTERVAL_S = 1.0

_SYSTEM_CLOCK = SystemClock()


def group_consumer(
    settings: KafkaConsumerSettings, *, group_id: str, client_id: str, write_timeout_s: float
) -> AIOKafkaConsumer:
    """A consumer in ``group_id`` with manual commits, for a :class:`BatchConsumer` (not started, not
    subscribed). ``write_timeout_s`` bounds one batch write: the group waits that much longer for a
    member to rejoin, which covers writing the batch when its partitions are revoked."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=_FETCH_MAX_WAIT_MS,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        rebalance_timeout_ms=settings.kafka_session_timeout_ms + int(write_timeout_s * 1000),
    )


class Stopped(Exception):
    """Raised by :meth:`BatchConsumer._take` when stop was requested while it could not complete; the
    loop goes straight to draining."""


class BatchConsumer(ABC, Generic[T]):
    """Moves messages of one topic into a store in batches; see the module docstring for the contract.

    ``consumer`` is a started :func:`group_consumer`; the caller closes it after :meth:`run` returns.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        topic: str,
        policy: BatchPolicy,
        metrics: ConsumerMetrics,
        clock: Clock = _SYSTEM_CLOCK,
        write_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._write_timeout_s = write_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._batch: Batch[T] = Batch(policy, clock)
        # The requests whose records the batch holds, for its write span (empty while tracing is off).
        self._links: list[tracing.Link] = []
        # Held while the batch changes (taking, writing); the revocation callback runs in the client's
        # coordination task and must not interleave with either.
        self._lock = asyncio.Lock()
        # Set (event-loop time) while partitions are paused after a failed write.
        self._retry_at: float | None = None
        self._backoff = RETRY_FIRST_S
        # Per assigned partition, the offset committed last (for the lag gauge).
        self._committed: dict[TopicPartition, int] = {}
        self._lag_reported_at = 0.0

    # --- what a subclass decides ----------------------------------------------------------------------

    @abstractmethod
    async def _take(self, record: Any, stop: asyncio.Event) -> T | None:
        """What one message becomes: an item of the batch, or ``None`` when it yields nothing to store
        (its offset is committed with the batch all the same). It must not fail for a bad message:
        whatever a message holds, decide here. May raise :class:`Stopped` once ``stop`` is set."""

    @abstractmethod
    async def _write(self, items: list[T]) -> None:
        """Store a batch durably and idempotently; offsets are committed only after this returns. An
        exception keeps the batch, which is written again later (whole, possibly with more items)."""

    # --- state ----------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Items read but not written yet."""
        return len(self._batch)

    @property
    def paused(self) -> bool:
        """True while writes fail and fetching is suspended."""
        return self._retry_at is not None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then write and commit the last batch.

        Returns normally after a stop. Any other exception (a bug, a non-retriable broker error) escapes
        with the current batch uncommitted, so its messages are redelivered.
        """
        self._consumer.subscribe([self._topic], listener=_FlushOnRevoke(self))
        log.info("consuming", extra={"topic": self._topic, "policy": self._policy})
        try:
            while not stop.is_set():
                await self._poll(stop)
        except Stopped:
            pass
        await self._drain()
        for tp in self._consumer.assignment():
            self._forget_lag(tp)

    # --- the loop -------------------------------------------------------------------------------------

    async def _poll(self, stop: asyncio.Event) -> None:
        await self._report_lag()
        if self._batch.closed() and self._retry_due():
            async with self._lock:
                await self._try_flush()
        fetched: dict[TopicPartition, list[Any]] = await self._consumer.getmany(
            timeout_ms=self._wait_ms(), max_records=max(1, self._batch.room)
        )
        if not fetched:
            return
        async with self._lock:
            assigned = self._consumer.assignment()
            for tp, records in fetched.items():
                if tp not in assigned:
                    # Revoked while these were in flight: the new owner reads them from the committed offset.
                    continue
                for record in records:
                    with tracing.consumed(self._topic, record.headers, tp.partition, record.offset):
                        item = await self._take(record, stop)
                    if item is None:
                        self._batch.skip(tp, record.offset)
                    else:
                        self._batch.add(tp, record.offset, item)
                        link = tracing.link_from(record.headers)
                        if link is not None:
                            self._links.append(link)

    def _wait_ms(self) -> int:
        if self._retry_at is not None:
            wait = self._retry_at - asyncio.get_running_loop().time()
        else:
            left = self._batch.seconds_left()
            wait = _MAX_POLL_WAIT_S if left is None else left
        return int(1000 * min(max(wait, 0.0), _MAX_POLL_WAIT_S))

    async def _report_lag(self) -> None:
        """Refresh the lag gauge, at most every ``_LAG_INTERVAL_S``."""
        now = self._clock.monotonic()
        if now - self._lag_reported_at < _LAG_INTERVAL_S:
            return
        self._lag_reported_at = now
        for tp in self._consumer.assignment():
            # Asked again each time: a rebalance can revoke partitions while this loop awaits.
            if tp not in self._consumer.assignment():
                continue
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            committed = self._committed.get(tp)
            if committed is None:
                try:
                    # Once per partition and assignment; later commits keep it current.
                    committed = await asyncio.wait_for(self._consumer.committed(tp), _LAG_INTERVAL_S) or 0
                except Exception:
                    log.debug("committed offset unavailable for the lag gauge", exc_info=True)
                    continue
                if tp not in self._consumer.assignment():
                    continue  # revoked while we asked; its new owner reports it
                committed = self._committed.setdefault(tp, committed)
            self._metrics.lag.labels(partition=str(tp.partition)).set(max(0, highwater - committed))

    def _forget_lag(self, tp: TopicPartition) -> None:
        """Stop reporting a partition this consumer no longer owns; its next owner reports it."""
        self._committed.pop(tp, None)
        with contextlib.suppress(KeyError):
            self._metrics.lag.remove(str(tp.partition))

    # --- writing and committing -----------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write the batch, then commit its offsets, then start a new batch. Caller holds the lock."""
        batch = self._batch
        if batch.items:
            started = time.perf_counter()
            with tracing.batch_span(f"{type(self).__name__}.write", self._links, len(batch)):
                await self._write(batch.items)
            self._metrics.batch_write.observe(time.perf_counter() - started)
            self._metrics.batch_rows.observe(len(batch))
        try:
            # A broker that came back without the group makes aiokafka retry the commit for minutes; the
            # batch is already stored, so give up quickly and let redelivery (idempotent) cover it.
            await asyncio.wait_for(self._consumer.commit(batch.offsets), _COMMIT_TIMEOUT_S)
            self._committed.update(batch.offsets)
        except (CommitFailedError, IllegalStateError, TimeoutError) as exc:
            # The batch is stored; the partitions' new owner re-reads it, and storing it again is a no-op.
            log.warning(
                "batch stored but offsets not committed (rebalance or broker restart)",
                extra={"rows": len(batch), "error": repr(exc)},
            )
        self._batch = Batch(self._policy, self._clock)
        self._links = []

    async def _try_flush(self) -> None:
        """One attempt at :meth:`_flush`; a failure pauses every partition until the retry is due."""
        if self._batch.empty:
            return
        try:
            await asyncio.wait_for(self._flush(), self._write_timeout_s)
        except Exception:
            self._metrics.write_failures.inc()
            retry_in = self._pause()
            log.warning(
                "writing a batch failed; partitions paused",
                exc_info=True,
                extra={"rows": len(self._batch), "retry_in_s": retry_in},
            )
        else:
            self._resume()

    def _pause(self) -> float:
        """Stop fetching and schedule the next attempt; returns the seconds until it."""
        self._consumer.pause(*self._consumer.assignment())
        self._metrics.paused.set(1)
        delay = self._backoff
        self._retry_at = asyncio.get_running_loop().time() + delay
        self._backoff = min(delay * 2, RETRY_MAX_S)
        return delay

    def _resume(self) -> None:
        if self._retry_at is None:
            return
        self._consumer.resume(*self._consumer.paused())
        log.info("batch written; partitions resumed")
        self._reset_retry()

    def _reset_retry(self) -> None:
        self._metrics.paused.set(0)
        self._retry_at = None
        self._backoff = RETRY_FIRST_S

    def _retry_due(self) -> bool:
        return self._retry_at is None or asyncio.get_running_loop().time() >= self._retry_at

    async def _drain(self) -> None:
        """On stop: write and commit the batch, retrying for ``shutdown_timeout_s`` before giving up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_timeout_s
        delay = RETRY_FIRST_S
        async with self._lock:
            while not self._batch.empty:
                try:
                    await asyncio.wait_for(self._flush(), self._write_timeout_s)
                except Exception:
                    if loop.time() >= deadline:
                        log.error(
                            "last batch not written; its messages stay uncommitted and will be redelivered",
                            exc_info=True,
                            extra={"rows": len(self._batch)},
                        )
                        return
                    log.warning("writing the last batch failed; retrying", exc_info=True)
                    await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                    delay = min(delay * 2, RETRY_MAX_S)
        log.info("consumer drained")

    # --- rebalancing ----------------------------------------------------------------------------------

    async def _partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            if not self._batch.empty:
                try:
                    await asyncio.wait_for(self._flush(), self._write_timeout_s)
                except Exception:
                    log.warning(
                        "batch not written before its partitions were revoked; their next owner re-reads it",
                        exc_info=True,
                        extra={"rows": len(self._batch)},
                    )
                    self._batch = Batch(self._policy, self._clock)
                    self._links = []
            # Pausing is per assignment; the next one starts unpaused.
            self._reset_retry()
            for tp in revoked:
                self._forget_lag(tp)
        if revoked:
            log.info("partitions revoked", extra={"partitions": sorted(str(tp) for tp in revoked)})

    def _partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": sorted(str(tp) for tp in assigned)})


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's rebalance hook: awaited before partitions go (and after new ones arrive)."""

    def __init__(self, owner: BatchConsumer[Any]) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._partitions_assigned(assigned)
