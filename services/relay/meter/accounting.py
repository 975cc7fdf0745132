"""The relay's side of the money: admit or reserve before the upstream call, settle or release after,
and publication of the usage event that records the request (built by :mod:`services.relay.meter.record`).

**On a lease** (:mod:`services.relay.meter.leasing`): a key without RPM/TPM/concurrency limits whose model's
price this relay knows is admitted locally against a lease (the key's own when it has a budget of its
own, else the one its user's keys share), for the request's worst case computed with the same function
and inputs as quota's Reserve (:func:`services.common.pricing.worst_case`). No
RPC is made, before or after: at the end the relay computes the cost itself (at the price it admitted
with, capped at the admitted worst case) and the usage event carrying that cost, the price id and the
lease id *is* the charge, applied by quota's consumer of the usage topic, idempotent by request id. The
event is not journalled: the publisher's spool keeps it across a Kafka outage, and the ledger and the
logs read the same number.

**Exact** (everything else, and a key the book has no open lease for yet): one Reserve RPC holds the
worst case; when quota answers that it has just recalled the user's leases to cover it
(:class:`~services.common.errors.CreditRecalled`), the reserve is tried again after each retry-after
for as long as quota keeps answering so, up to the longest a live relay takes to give a recalled lease
back (:func:`~services.relay.meter.credit.recall_wait_ms`): quota answers "recalled" only while the unused
credit of open leases would cover the request, so the wait ends as soon as the leases closed (held,
or the exact refusal), and only a relay failing its syncs makes the caller see ``credit_recalled``.

The exact path settles like the lease path: when the request ends the relay computes its cost (at
the price the ReserveResponse returned, capped at the reserved amount) and the usage event carrying
that cost, the price id and the reservation id settles the hold in quota's consumer of the usage
topic (an event without usage releases it), so a request makes one RPC, not two. The event is not
journalled: the publisher's spool keeps it across a Kafka outage, and quota settles it whenever it
arrives, idempotent by reservation id (also with a Settle from an older relay). A relay killed before
the event left the process leaves the hold to expire in quota, charging nothing; what that costs the
operator is bounded by the relay's in-flight requests (README, failure policy).

Only a relay without a usage topic (``RELAYGATE_KAFKA_BOOTSTRAP`` empty: nothing would settle) still
settles or releases by RPC: keyed by the reservation id and idempotent in quota, the first attempt
when the request ends, further ones in the background with exponential backoff and jitter for at
most ``SettleRetry.window_s`` (well under quota's reservation TTL), so a response never waits for
them; when they give up, the hold expires and charges nothing. Pending retries are drained on
shutdown (:meth:`Meter.close`). However many channels a request tried, it holds one reservation and
is settled once.

Every failure is tagged with whose fault it was (``caller``, ``policy``, ``provider``, ``gateway``):
in the usage event, in the ``relaygate_relay_failures`` metric and in the log line written for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common import pricing, tracing
from services.common.errors import CreditRecalled, GatewayError, InvalidRequest
from services.common.grpc import call
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.quota.v1.quota_pb2 import (
    ReleaseRequest,
    ReserveRequest,
    ReserveResponse,
    SettleRequest,
    SettleResponse,
)
from services.common.telemetry import METRICS
from services.relay.meter.leasing import Leasing, leasable
from services.relay.meter.perf import PerfRecorder
from services.relay.meter.prices import PriceCache, price_from_message
from services.relay.meter.publisher import EventPublisher
from services.relay.meter.record import Exchange
from services.relay.meter.refusals import RefusalLog

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

log = logging.getLogger(__name__)


@functools.cache
def metric(series: Any, *labels: str) -> Any:
    """The child of a labelled series, looked up once per label combination (labels are bounded)."""
    return series.labels(*labels)


@dataclass(frozen=True, slots=True)
class SettleRetry:
    """How a settle or release that quota could not answer is tried again, off the response path."""

    # Give up this long after the first failure: then the hold expires (charging nothing). Keep it
    # well under quota's reservation TTL, so a late success never meets an expired hold.
    window_s: float = 30.0
    first_delay_s: float = 0.1
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (between half and all of the step), so relays that lost
        quota together do not come back in lockstep."""
        step: float = min(self.max_delay_s, self.first_delay_s * 2.0**attempt)
        return step * random.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class LeaseAdmission:
    """Admission on leases: the process's lease book and price cache, and how long an exact reserve
    waits for leases quota recalled (``recall_window_s``; by default what a live relay may take to give
    them back, :attr:`Leasing.recall_wait_s`)."""

    leasing: Leasing
    prices: PriceCache
    recall_window_s: float | None = None

    @property
    def recall_wait_s(self) -> float:
        if self.recall_window_s is not None:
            return self.recall_window_s
        return self.leasing.recall_wait_s


def _cost(price: pricing.Price, usage: Usage | None, bound: int) -> int:
    """What a request held for ``bound`` costs at the price it was held at: nothing when nothing was
    delivered, never more than its hold."""
    if usage is None:
        return 0
    counted = pricing.Usage.reported(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_prompt_tokens,
        usage.images,
        False,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    return min(pricing.cost(price, counted), bound)


class Meter:
    """Admission on leases, reserve / settle / release over gRPC, and publication of the usage event."""

    def __init__(
        self,
        stub: QuotaServiceAsyncStub,
        publisher: EventPublisher | None,
        *,
        rpc_timeout_s: float,
        retry: SettleRetry | None = None,
        leases: LeaseAdmission | None = None,
        perf: PerfRecorder | None = None,
    ) -> None:
        self._stub = stub
        self._publisher = publisher
        self._timeout = rpc_timeout_s
        self._retry = retry or SettleRetry()
        # Only with a publisher: on a lease the usage event is the charge.
        self._leases = leases if publisher is not None else None
        # Looked up once: a labelled child costs about as much as an admission itself.
        self._on_lease = METRICS.relay_credit_admissions.labels(path="lease")
        self._exact = METRICS.relay_credit_admissions.labels(path="exact")
        self._pending: set[asyncio.Task[None]] = set()
        self._refusals = RefusalLog(publisher.publish) if publisher is not None else None
        self._perf = perf

    @property
    def pending(self) -> int:
        """Settlements being retried in the background."""
        return len(self._pending)

    async def reserve(
        self, exchange: Exchange, *, prompt_tokens: int, max_output_tokens: int, images: int = 0
    ) -> None:
        """Hold the request's worst case: on a lease when it can (its key's, or its user's shared one),
        else with a Reserve RPC."""
        principal = exchange.principal
        assert principal is not None, "reserve needs an authenticated exchange"
        with tracing.span("relay.credit") as credit_span:
            if self._admit(exchange, principal, prompt_tokens, max_output_tokens, images):
                self._on_lease.inc()
                credit_span.set_attribute("relaygate.credit.held_on", "lease")
                return
            self._exact.inc()
            credit_span.set_attribute("relaygate.credit.held_on", "reservation")
            request = ReserveRequest(
                reservation_id=exchange.request_id,
                key_id=principal.key_id,
                user_id=principal.user_id,
                model=exchange.model,
                prompt_tokens=prompt_tokens,
                max_output_tokens=max_output_tokens,
                images=images,
                choices=exchange.choices,
                key_limits=principal.key_limits,
                user_limits=principal.user_limits,
            )
            exchange.reserved(await self._reserve_exact(request))

    def _admit(
        self,
        exchange: Exchange,
        principal: Principal,
        prompt_tokens: int,
        max_output_tokens: int,
        images: int,
    ) -> bool:
        leases = self._leases
        if leases is None or not leasable(principal):
            return False
        price = leases.prices.get(exchange.model)
        if price is None:
            return False
        try:
            bound = pricing.worst_case(
                price,
                prompt_tokens=prompt_tokens,
                max_output_tokens=max_output_tokens,
                images=images,
                choices=exchange.choices,
            )
        except InvalidRequest:
            # Out of bounds: quota's Reserve gives the caller its authoritative refusal.
            return False
        admission = leases.leasing.admit(principal, bound)
        if admission is None:
            return False
        exchange.admitted(admission, price)
        return True

    async def _reserve_exact(self, request: ReserveRequest) -> ReserveResponse:
        """One Reserve; tried again after each retry-after while quota answers that it recalled the
        user's leases to cover it, until ``recall_wait_s`` after the first such answer (a Reserve
        slowed by the load that caused the recall does not eat into it), the last try at that moment;
        a recall still answered then is the caller's answer."""
        leases = self._leases
        if leases is None:
            return await call(self._stub.Reserve, request, timeout=self._timeout)
        loop = asyncio.get_running_loop()
        # Quota's "retry now" (the leases closed meanwhile) is still not a busy loop.
        least_s = leases.leasing.book.terms.sync_interval_ms / 10_000
        give_up: float | None = None
        while True:
            try:
                return await call(self._stub.Reserve, request, timeout=self._timeout)
            except CreditRecalled as exc:
                now = loop.time()
                if give_up is None:
                    give_up = now + leases.recall_wait_s
                if now >= give_up:
                    raise
                wait = max(least_s, exc.retry_after or 0.0)
                await asyncio.sleep(min(wait, give_up - now))

    def first_byte(self, exchange: Exchange) -> None:
        """The first byte of a stream reached the client (the stream may be metered as finished
        already: a short upstream stream can end before the client's writer first runs)."""
        seconds = exchange.wrote_first_byte()
        metric(METRICS.stream_ttfb, exchange.front, exchange.endpoint).observe(seconds)
        if self._perf is not None:
            self._perf.first_byte(seconds)

    async def finish(self, exchange: Exchange) -> None:
        """Publish the event that settles the request (or records it), record metrics.

        Never raises. Without a usage topic, a reservation is settled (usage known) or released by
        RPC instead, waiting for one attempt only: the retries go on in the background."""
        self.observe(exchange)
        if self._perf is not None:
            self._perf.finished(exchange)
        if exchange.lease_id:
            if self._finish_admission(exchange):
                self._emit(exchange.to_event(), known=True)
            return
        reservation = exchange.reservation
        if reservation is None:
            self._emit(exchange.to_event(), known=exchange.principal is not None)
            return
        if self._publisher is not None:
            price = price_from_message(reservation.price)
            exchange.charged(price, _cost(price, exchange.usage, reservation.reserved_micros))
            self._emit(exchange.to_event(), known=True)
            return
        rpc = functools.partial(self._rpc, reservation.reservation_id, exchange.usage, exchange.end_reason)
        try:
            exchange.settled(await rpc())
        except GatewayError as exc:
            if not isinstance(exc, InvalidRequest):
                self._track(self._settle_later(exchange, rpc, exc), exchange.request_id)
                return
            # Quota refused the settlement itself (an unknown hold): nothing was charged.
            log.error(
                "settling refused: %s",
                exc.message,
                extra={"reservation_id": exchange.request_id, "code": exc.code},
            )
        self._emit(exchange.to_event(), known=True)

    def abandon(self, exchange: Exchange) -> None:
        """A request task cancelled before it finished: its admission on a lease charges nothing and
        publishes no event, like an exact hold left to expire. A stream that reached its upstream is
        finished by its pump instead (:mod:`services.relay.stream.streaming`)."""
        if exchange.stream and exchange.status_code:
            return
        if exchange.admission is not None:
            exchange.cancelled()
            self._finish_admission(exchange)

    def _finish_admission(self, exchange: Exchange) -> bool:
        """Finish the lease admission of ``exchange`` once: what it cost at the price it was admitted
        with (nothing when nothing was delivered), capped at its worst case. False on a repeat."""
        admission = exchange.admission
        leases = self._leases
        price = exchange.price
        if admission is None or leases is None or price is None:
            return False
        amount = _cost(price, exchange.usage, admission.bound)
        exchange.lease_finished(leases.leasing.finish(admission, amount))
        return True

    async def close(self, *, timeout: float) -> None:
        """Let pending settlements finish (bounded by ``timeout``); the rest give up and publish 0."""
        if self._refusals is not None:
            self._refusals.flush()
        if not self._pending:
            return
        _, cut = await asyncio.wait(set(self._pending), timeout=timeout)
        for task in cut:
            task.cancel()
        if cut:
            log.error("settlements given up at shutdown; their holds expire", extra={"count": len(cut)})
            await asyncio.wait(cut, timeout=5.0)

    def _rpc(self, reservation_id: str, usage: Usage | None, reason: str) -> Awaitable[SettleResponse]:
        if usage is not None:
            return call(
                self._stub.Settle,
                SettleRequest(reservation_id=reservation_id, usage=usage),
                timeout=self._timeout,
            )
        return call(
            self._stub.Release,
            ReleaseRequest(reservation_id=reservation_id, reason=reason),
            timeout=self._timeout,
        )

    def _track(self, work: Coroutine[Any, Any, None], request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"settle-{request_id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle_later(
        self, exchange: Exchange, rpc: Callable[[], Awaitable[SettleResponse]], first: GatewayError
    ) -> None:
        try:
            exchange.settled(await self._retrying(rpc, first, exchange.request_id))
        finally:
            # Whatever happened, the event says what the ledger charged (0 without a settlement).
            self._emit(exchange.to_event(), known=True)

    async def _retrying(
        self, rpc: Callable[[], Awaitable[SettleResponse]], first: GatewayError | None, request_id: str
    ) -> SettleResponse | None:
        """Try ``rpc`` until quota answers or the retry window closes (None then: the hold expires
        in quota and charges nothing). ``first`` is the failure of an attempt already made."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry.window_s
        error = first
        attempt = 0
        METRICS.relay_settle_retries.labels(outcome="started").inc()
        try:
            while True:
                if error is not None:
                    delay = self._retry.delay(attempt)
                    if loop.time() + delay >= give_up:
                        break
                    await asyncio.sleep(delay)
                attempt += 1
                try:
                    outcome = await rpc()
                except GatewayError as exc:
                    error = exc
                    if isinstance(exc, InvalidRequest):
                        break
                    continue
                METRICS.relay_settle_retries.labels(outcome="settled").inc()
                return outcome
        except asyncio.CancelledError:
            METRICS.relay_settle_retries.labels(outcome="gave_up").inc()
            raise
        METRICS.relay_settle_retries.labels(outcome="gave_up").inc()
        log.error(
            "settling failed; the hold expires in quota and charges nothing",
            extra={
                "reservation_id": request_id,
                "error": error.message if error is not None else "",
                "attempts": attempt,
            },
        )
        return None

    def _emit(self, event: UsageEvent, *, known: bool) -> None:
        """Publish ``event``, aggregated when it was refused before the key was known."""
        if self._publisher is None or self._refusals is None:
            return
        if not known:
            self._refusals.record(event)
            return
        self._publisher.publish(event)

    @staticmethod
    def observe(exchange: Exchange) -> None:
        """Metrics, and the log line of a failure, for one finished request."""
        error = exchange.error
        fault = error.fault if error is not None else ""
        front, route = exchange.front, exchange.endpoint
        metric(METRICS.http_requests, front, route, str(exchange.status_code), fault).inc()
        elapsed = exchange.elapsed_s()
        metric(METRICS.http_latency, front, route).observe(elapsed)
        metric(METRICS.gateway_overhead, front, route).observe(max(0.0, elapsed - exchange.upstream_s))
        if error is not None:
            metric(METRICS.relay_failures, error.fault, error.code).inc()
            log.log(
                logging.ERROR if error.fault == "gateway" else logging.WARNING,
                "request failed: %s",
                error.message,
                extra={
                    "fault": error.fault,
                    "code": error.code,
                    "status": exchange.status_code,
                    "endpoint": exchange.endpoint,
                    "model": exchange.model,
                    "channel_id": exchange.channel_id,
                    "attempts": exchange.attempts,
                    "end_reason": exchange.end_reason,
                    "client_request_id": exchange.client_request_id,
                },
            )
