"""Settlement from the usage stream: quota's own consumer of the usage topic charges credit leases.

A request a relay admitted on a lease is charged by its usage event, not by an RPC: the event names the
lease (``UsageEvent.lease_id``) and carries the cost the relay computed, the same number the logger
logs, so the ledger and the request logs agree per request by construction. This consumer reads the
topic in quota's own group (``RELAYGATE_SETTLE_GROUP_ID``, default ``relaygate-quota``) and applies
each batch in one transaction with :meth:`services.quota.leasing.CreditStore.charge`::

    usage topic ──▶ decode ──▶ Charge(request id, lease, key, user, cost) ──▶ batch
                      │ no lease, undecodable, invalid                          │
                      └──▶ counted and passed over                             ▼
                                            CreditStore.charge(batch)  (one primary transaction)
                                                                                │ committed
                                                                                ▼
                                                                   commit Kafka offsets

The loop is the shared :class:`~services.common.consumer.BatchConsumer` (offsets only after the
write is durable; a failed write pauses fetching and retries the same batch; a rebalance writes the
batch before the partitions go, or leaves it uncommitted for their next owner). Charges are
idempotent by request id, so every replay (a retry, a restart, two members during a rebalance) posts
nothing twice; that is also why the logger's and quota's groups can read the same events
independently.

Passed over, with a counter (``relaygate_quota_settle_records``) and, for the two last kinds, a log
line: events without a lease (exact reservations are settled by their Settle RPC; refusals summarised
before the key was known carry no account), undecodable records (the logger dead-letters them; a
record that is no ``UsageEvent`` cannot be a charge) and events no charge can be made of (a lease but
no user, a negative cost, an id the books refuse). A refused charge never holds up the others of its
batch.

Quota keeps serving while Kafka is unreachable: the consumer is (re)started in the background and
leased charges wait on the topic, never lost. While they wait, the leases' unused credit stays held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import Field, model_validator

from services.common.batch import BatchPolicy
from services.common.clock import Clock, SystemClock
from services.common.config import KafkaConsumerSettings
from services.common.consumer import BatchConsumer, group_consumer
from services.common.credit import Charge
from services.common.errors import InvalidRequest
from services.common.events import decode, ensure_topics
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.telemetry import METRICS
from services.quota.credit import Posted

__all__ = ["ChargeBook", "SettlingConsumer", "SettlingSettings", "charge_of", "settling", "settling_consumer"]

log = logging.getLogger(__name__)

# Backoff between attempts at (re)starting the consumer: the broker is unreachable, or the loop failed.
_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 10.0
# Time allowed for leaving the group on shutdown, beyond charging the last batch.
_LEAVE_S = 5.0

_SYSTEM_CLOCK = SystemClock()


class SettlingSettings(KafkaConsumerSettings):
    """How quota consumes the usage topic. An empty ``RELAYGATE_KAFKA_BOOTSTRAP`` turns settlement from
    the stream off (then nothing may be leased: a relay's leased requests would never be charged)."""

    settle_group_id: str = "relaygate-quota"
    # A batch is charged when it holds this many events, or this long after its first one. The linger is
    # short: a lease closes only once its reported use has been charged.
    settle_batch_max_rows: int = Field(default=1000, ge=1, le=100_000)
    settle_batch_max_seconds: float = Field(default=0.2, gt=0, le=60)
    # One attempt at charging a batch; a slower attempt counts as failed and is retried.
    settle_write_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # On shutdown, how long the last batch may keep retrying before it is left uncommitted (its events
    # are redelivered to the group's next member, never lost).
    settle_shutdown_timeout_s: float = Field(default=10.0, ge=0, le=600)

    @model_validator(mode="after")
    def _check_group(self) -> SettlingSettings:
        if not self.settle_group_id.strip():
            raise ValueError("RELAYGATE_SETTLE_GROUP_ID must not be empty: offsets are stored per group")
        return self

    @property
    def settle_policy(self) -> BatchPolicy:
        return BatchPolicy(max_rows=self.settle_batch_max_rows, max_seconds=self.settle_batch_max_seconds)


class ChargeBook(Protocol):
    """Where charges are posted: :class:`services.quota.leasing.CreditStore`."""

    async def charge(self, charges: Sequence[Charge]) -> Sequence[Posted]:
        """Post a batch in one transaction, idempotent by request id; returns what this call posted.
        Raises :class:`InvalidRequest` for a batch holding a charge that can never be posted."""
        ...


@dataclass(frozen=True, slots=True)
class _Usage:
    charge: Charge
    occurred_at_ms: int


def charge_of(event: UsageEvent) -> Charge | None:
    """The charge a usage event makes, or ``None`` when it makes none (it was not admitted on a lease).

    Raises ``ValueError`` for an event that names a lease but cannot be a charge.
    """
    if not event.lease_id:
        return None
    if event.aggregated:
        raise ValueError("a summary of refusals cannot name a lease")
    if not event.user_id:
        raise ValueError("an event admitted on a lease has no user_id")
    if event.cost_micros < 0:
        raise ValueError(f"negative cost_micros ({event.cost_micros})")
    return Charge(
        request_id=event.event_id,
        hold_id=event.lease_id,
        key_id=event.key_id,
        user_id=event.user_id,
        cost_micros=event.cost_micros,
    )


def settling_consumer(settings: SettlingSettings) -> AIOKafkaConsumer:
    """Quota's group consumer of the usage topic (not started, not subscribed)."""
    return group_consumer(
        settings,
        group_id=settings.settle_group_id,
        client_id="relaygate-quota",
        write_timeout_s=settings.settle_write_timeout_s,
    )


class SettlingConsumer(BatchConsumer[_Usage]):
    """Charges leases from usage events; see the module docstring.

    ``consumer`` is a started :func:`settling_consumer`; the caller closes it after :meth:`run` returns.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        *,
        book: ChargeBook,
        topic: str,
        policy: BatchPolicy,
        clock: Clock = _SYSTEM_CLOCK,
        write_timeout_s: float = 10.0,
        shutdown_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            consumer,
            topic=topic,
            policy=policy,
            metrics=METRICS.quota_settle_consumer,
            clock=clock,
            write_timeout_s=write_timeout_s,
            shutdown_timeout_s=shutdown_timeout_s,
        )
        self._book = book

    async def _take(self, record: Any, stop: asyncio.Event) -> _Usage | None:
        try:
            event = decode(record.value)
        except ValueError as exc:
            _passed_over(record, "undecodable", exc)
            return None
        try:
            charge = charge_of(event)
        except ValueError as exc:
            _passed_over(record, "invalid", exc)
            return None
        if charge is None:
            METRICS.quota_settle_records.labels(result="no_lease").inc()
            return None
        return _Usage(charge, event.occurred_at_ms)

    async def _write(self, items: list[_Usage]) -> None:
        charges = [item.charge for item in items]
        try:
            posted = list(await self._book.charge(charges))
        except InvalidRequest:
            # One charge the books refuse must not hold up the others: post them one by one (a repeat
            # of those already posted changes nothing) and pass over the refused.
            posted = await self._charge_each(charges)
        _count(len(charges), posted)
        now_ms = self._clock.time() * 1000
        for item in items:
            METRICS.quota_settle_end_to_end.observe(max(0.0, now_ms - item.occurred_at_ms) / 1000)

    async def _charge_each(self, charges: list[Charge]) -> list[Posted]:
        posted: list[Posted] = []
        for charge in charges:
            try:
                posted += await self._book.charge([charge])
            except InvalidRequest as exc:
                METRICS.quota_settle_records.labels(result="invalid").inc()
                log.warning(
                    "usage event refused as a charge; passed over",
                    extra={"event_id": charge.request_id, "lease_id": charge.hold_id, "reason": str(exc)},
                )
        return posted


def _passed_over(record: Any, result: str, reason: Exception) -> None:
    METRICS.quota_settle_records.labels(result=result).inc()
    log.warning(
        "usage record is no charge; passed over",
        extra={
            "source_topic": record.topic,
            "source_partition": record.partition,
            "source_offset": record.offset,
            "reason": f"{type(reason).__name__}: {reason}",
        },
    )


def _count(offered: int, posted: list[Posted]) -> None:
    METRICS.quota_settle_records.labels(result="charged").inc(len(posted))
    # Already charged (a replay), a zero cost, or an exact reservation's (its Settle charges it).
    METRICS.quota_settle_records.labels(result="unchanged").inc(max(0, offered - len(posted)))
    written_off = sum(p.written_off for p in posted)
    if written_off:
        METRICS.quota_written_off_micros.inc(written_off)
        log.warning(
            "late charges written off: their leases were given back and the balance could not cover them",
            extra={"micros": written_off, "charges": sum(1 for p in posted if p.written_off)},
        )


# --- running it beside quota's gRPC server ------------------------------------------------------------


@contextlib.asynccontextmanager
async def settling(settings: SettlingSettings, book: ChargeBook) -> AsyncIterator[None]:
    """Consume the usage topic in the background while the context is open; on exit, charge and commit
    the last batch (bounded by ``settle_shutdown_timeout_s``) and leave the group.

    A broker that cannot be reached, or a consumer that fails, is retried with backoff: settlement
    resumes from the committed offsets and never stops quota from serving.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(_supervise(settings, book, stop), name="quota-settling")
    try:
        yield
    finally:
        stop.set()
        # Draining is bounded by its own timeouts; this also bounds leaving the group, so a broker that
        # stopped answering cannot hold quota's shutdown.
        bound = settings.settle_shutdown_timeout_s + settings.settle_write_timeout_s + _LEAVE_S
        try:
            await asyncio.wait_for(task, bound)
        except TimeoutError:
            log.error("settling did not stop in time; cancelled, its last batch stays uncommitted")


async def _supervise(settings: SettlingSettings, book: ChargeBook, stop: asyncio.Event) -> None:
    delay = _RESTART_FIRST_S
    while not stop.is_set():
        try:
            consumer = await _start(settings, stop)
            if consumer is None:
                return
            try:
                delay = _RESTART_FIRST_S
                await SettlingConsumer(
                    consumer,
                    book=book,
                    topic=settings.usage_topic,
                    policy=settings.settle_policy,
                    write_timeout_s=settings.settle_write_timeout_s,
                    shutdown_timeout_s=settings.settle_shutdown_timeout_s,
                ).run(stop)
            finally:
                # Leaves the group at once, so the partitions move without waiting for a session timeout.
                await consumer.stop()
        except KafkaError as exc:
            # Typically the broker is unreachable; no traceback for the expected.
            log.warning(
                "usage topic unavailable; settling retries", extra={"error": repr(exc), "in_s": delay}
            )
        except Exception:
            log.error(
                "settling from the usage topic failed; restarting", exc_info=True, extra={"in_s": delay}
            )
        else:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, _RESTART_MAX_S)


async def _start(settings: SettlingSettings, stop: asyncio.Event) -> AIOKafkaConsumer | None:
    """A started consumer, or ``None`` when stop came first (the attempt is abandoned)."""
    consumer = settling_consumer(settings)
    attempt = asyncio.ensure_future(_connect(settings, consumer))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    try:
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attempt
            await consumer.stop()
            return None
        attempt.result()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def _connect(settings: SettlingSettings, consumer: AIOKafkaConsumer) -> None:
    # The logger creates the topics too; whichever process starts first does it.
    await ensure_topics(settings)
    await consumer.start()
