"""Settlement from the usage stream: quota's own consumer of the usage topic charges every held request.

A request is charged by its usage event, not by an RPC: the event names its hold (``lease_id`` for an
admission on a lease, ``reservation_id`` for an exact reservation) and carries the cost the relay
computed at the hold's price, the same number the logger logs, so the ledger and the request logs
agree per request by construction. An exact reservation is settled by its event as a Settle RPC
would settle it (``Ledger.settle_charged``: charged, the rest of its hold released, its concurrency
slots freed); a Settle or Release from an older relay and the event are idempotent with each other
(whichever finishes the hold first decides). A request whose event never comes is released by
expiry. An event that comes after its reservation was expired or released (a Kafka outage or a lag
longer than the reservation TTL) is still charged, *late*, by the rule late lease charges follow
(:mod:`services.quota.late_charges`): from what the balance and budget windows have free, the rest
written off next to the charge; so ledger and logs agree per request id however late the event is.
This consumer reads the topic in quota's own group (``RELAYGATE_SETTLE_GROUP_ID``, default
``relaygate-quota``) and applies each batch's lease charges in one transaction with
:meth:`services.quota.leasing.CreditStore.charge` and its exact settlements through the ledger's
group commit::

    usage topic ──▶ decode ──▶ Charge(request id, lease or reservation, cost) ──▶ batch
                      │ no hold, undecodable, invalid                            │
                      └──▶ counted and passed over                             ▼
                        CreditStore.charge(leased) + Ledger.settle_charged(each exact)
                                                                                │ committed
                                                                                ▼
                                                                   commit Kafka offsets

The loop is the shared :class:`~services.common.consumer.BatchConsumer` (offsets only after the
write is durable; a failed write pauses fetching and retries the same batch; a rebalance writes the
batch before the partitions go, or leaves it uncommitted for their next owner). Charges are
idempotent by request id, so every replay (a retry, a restart, two members during a rebalance) posts
nothing twice; that is also why the logger's and quota's groups can read the same events
independently.

Counted by result (``relaygate_quota_settle_records``): ``charged`` (lease charges), ``settled``
(exact reservations), ``late`` (exact reservations charged late), ``unchanged`` (replays, zero costs);
what late charges of either kind wrote off is ``relaygate_quota_written_off_micros``, with a log line.

Passed over, with a counter (``relaygate_quota_settle_records``) and, for the two last kinds, a log
line: events without a hold (refusals carry no account), undecodable records (the logger
dead-letters them; a record that is no ``UsageEvent`` cannot be a charge) and events no charge can
be made of (a hold but no user, a negative cost, an id the books refuse, a reservation quota does
not know). A refused charge never holds up the others of its batch.

Quota keeps serving while Kafka is unreachable: the consumer is (re)started in the background and
charges wait on the topic, never lost. While they wait, the holds' unused credit stays held.
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
from services.common.errors import InvalidRequest, NotFound
from services.common.events import decode, ensure_topics
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pricing import Usage
from services.common.telemetry import METRICS
from services.quota.credit import Posted
from services.quota.settlement import FLAG_LATE, Outcome

__all__ = [
    "ChargeBook",
    "ExactSettlement",
    "ReservationBook",
    "SettlingConsumer",
    "SettlingSettings",
    "charge_of",
    "settlement_of",
    "settling",
    "settling_consumer",
]

log = logging.getLogger(__name__)

# Backoff between attempts at (re)starting the consumer: the broker is unreachable, or the loop failed.
_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 10.0
# Time allowed for leaving the group on shutdown, beyond charging the last batch.
_LEAVE_S = 5.0

_SYSTEM_CLOCK = SystemClock()


class SettlingSettings(KafkaConsumerSettings):
    """How quota consumes the usage topic. An empty ``RELAYGATE_KAFKA_BOOTSTRAP`` turns settlement from
    the stream off: then the relays must run without Kafka too (they settle reservations by RPC and
    lease nothing), or their requests would never be charged and their holds would only expire."""

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


class ReservationBook(Protocol):
    """Where exact reservations are settled: :class:`services.quota.ledger.Ledger`."""

    async def settle_charged(self, reservation_id: str, usage: Usage, cost_micros: int) -> Outcome:
        """Settle a reservation at its event's cost, idempotent with Settle, Release and expiry (after
        which it is charged late, flag ``late``, with ``written_off_micros``). Raises
        :class:`NotFound` for an unknown reservation, :class:`InvalidRequest` for a malformed one."""
        ...

    async def release(self, reservation_id: str, reason: str = "") -> Outcome:
        """Release a reservation whose request used nothing, idempotent like :meth:`settle_charged`."""
        ...


@dataclass(frozen=True, slots=True)
class ExactSettlement:
    """What a usage event of an exact reservation settles."""

    reservation_id: str
    # None: nothing was delivered (the event carries no usage) and the hold is released.
    usage: Usage | None
    cost_micros: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class _Usage:
    charge: Charge | ExactSettlement
    occurred_at_ms: int


def settlement_of(event: UsageEvent) -> ExactSettlement | None:
    """The settlement the usage event of an exact reservation makes, or ``None`` when it names no
    reservation (admitted on a lease, or refused before a hold). An event without usage (nothing was
    delivered) releases the hold. Raises ``ValueError`` for an event that names a reservation but
    cannot settle it."""
    if event.lease_id or not event.reservation_id:
        return None
    if event.cost_micros < 0:
        raise ValueError(f"negative cost_micros ({event.cost_micros})")
    if not event.HasField("usage"):
        if event.cost_micros:
            raise ValueError(f"a cost ({event.cost_micros}) without usage")
        return ExactSettlement(event.reservation_id, None, 0, event.end_reason)
    u = event.usage
    usage = Usage.reported(
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_prompt_tokens,
        u.images,
        u.estimated,
        cache_write_tokens=u.cache_write_tokens,
        reasoning_tokens=u.reasoning_tokens,
    )
    return ExactSettlement(event.reservation_id, usage, event.cost_micros)


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
        reservations: ReservationBook,
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
        self._reservations = reservations

    async def _take(self, record: Any, stop: asyncio.Event) -> _Usage | None:
        try:
            event = decode(record.value)
        except ValueError as exc:
            _passed_over(record, "undecodable", exc)
            return None
        try:
            charge: Charge | ExactSettlement | None = charge_of(event) or settlement_of(event)
        except ValueError as exc:
            _passed_over(record, "invalid", exc)
            return None
        if charge is None:
            METRICS.quota_settle_records.labels(result="no_hold").inc()
            return None
        return _Usage(charge, event.occurred_at_ms)

    async def _write(self, items: list[_Usage]) -> None:
        charges = [item.charge for item in items if isinstance(item.charge, Charge)]
        exact = [item.charge for item in items if isinstance(item.charge, ExactSettlement)]
        # The ledger's group commit puts concurrent settlements in shared transactions; every one is
        # idempotent, so a failure retries the whole batch safely.
        outcomes = [o for o in await asyncio.gather(*(self._settle(s) for s in exact)) if o is not None]
        posted: list[Posted] = []
        if charges:
            try:
                posted = list(await self._book.charge(charges))
            except InvalidRequest:
                # One charge the books refuse must not hold up the others: post them one by one (a
                # repeat of those already posted changes nothing) and pass over the refused.
                posted = await self._charge_each(charges)
        _count(len(charges), posted)
        _count_exact(outcomes)
        now_ms = self._clock.time() * 1000
        for item in items:
            METRICS.quota_settle_end_to_end.observe(max(0.0, now_ms - item.occurred_at_ms) / 1000)

    async def _settle(self, exact: ExactSettlement) -> Outcome | None:
        """Settle one exact reservation (or charge it late); None when it cannot be."""
        try:
            if exact.usage is None:
                outcome = await self._reservations.release(exact.reservation_id, exact.reason)
            else:
                outcome = await self._reservations.settle_charged(
                    exact.reservation_id, exact.usage, exact.cost_micros
                )
        except (InvalidRequest, NotFound) as exc:
            METRICS.quota_settle_records.labels(result="invalid").inc()
            log.warning(
                "usage event refused as a settlement; passed over",
                extra={"reservation_id": exact.reservation_id, "reason": str(exc)},
            )
            return None
        return outcome

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
    # Already charged (a replay), or a zero cost.
    METRICS.quota_settle_records.labels(result="unchanged").inc(max(0, offered - len(posted)))
    _written_off("leases", [p.written_off for p in posted])


def _count_exact(outcomes: list[Outcome]) -> None:
    done = [o for o in outcomes if not o.repeated]
    late = sum(1 for o in done if FLAG_LATE in o.flags)
    METRICS.quota_settle_records.labels(result="settled").inc(len(done) - late)
    METRICS.quota_settle_records.labels(result="late").inc(late)
    # Finished already (a replay, a Settle first), or charged late already.
    METRICS.quota_settle_records.labels(result="unchanged").inc(len(outcomes) - len(done))
    _written_off("reservations", [o.written_off_micros for o in done])


def _written_off(holds: str, amounts: list[int]) -> None:
    written_off = sum(amounts)
    if written_off:
        METRICS.quota_written_off_micros.inc(written_off)
        log.warning(
            f"late charges written off: their {holds} were given back and the balance could not cover them",
            extra={"micros": written_off, "charges": sum(1 for amount in amounts if amount)},
        )


# --- running it beside quota's gRPC server ------------------------------------------------------------


@contextlib.asynccontextmanager
async def settling(
    settings: SettlingSettings, book: ChargeBook, reservations: ReservationBook
) -> AsyncIterator[None]:
    """Consume the usage topic in the background while the context is open; on exit, charge and commit
    the last batch (bounded by ``settle_shutdown_timeout_s``) and leave the group.

    A broker that cannot be reached, or a consumer that fails, is retried with backoff: settlement
    resumes from the committed offsets and never stops quota from serving.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(_supervise(settings, book, reservations, stop), name="quota-settling")
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


async def _supervise(
    settings: SettlingSettings, book: ChargeBook, reservations: ReservationBook, stop: asyncio.Event
) -> None:
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
                    reservations=reservations,
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
