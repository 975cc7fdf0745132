"""The relay's side of the money: reserve before the upstream call, settle or release after, and the
usage event that records the request.

Settle and release are keyed by the reservation id and idempotent in quota, so they are safe to
retry. If the relay dies between reserve and settle, quota expires the hold itself. However many
channels a request tried, it holds one reservation and is settled once.

Every failure is tagged with whose fault it was (``caller``, ``policy``, ``provider``, ``gateway``):
in the usage event, in the ``relaygate_relay_failures`` metric and in the log line written for it.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.common.errors import GatewayError
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
from services.relay.publisher import EventPublisher

if TYPE_CHECKING:
    from services.common.pb.relaygate.quota.v1.quota_pb2_grpc import QuotaServiceAsyncStub

log = logging.getLogger(__name__)


@functools.cache
def metric(series: Any, *labels: str) -> Any:
    """The child of a labelled series, looked up once per label combination (labels are bounded)."""
    return series.labels(*labels)


@dataclass(slots=True)
class Exchange:
    """What the relay learned about one request, from arrival to the usage event."""

    request_id: str
    endpoint: str
    client_ip: str
    started: float = field(default_factory=time.perf_counter)
    occurred_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    principal: Principal | None = None
    model: str = ""
    stream: bool = False
    reservation: ReserveResponse | None = None
    settlement: SettleResponse | None = None
    channel_id: str = ""
    upstream_model: str = ""
    status_code: int = 0
    usage: Usage | None = None
    upstream_s: float = 0.0
    ttfb_s: float = 0.0
    attempts: int = 0
    end_reason: str = ""
    error: GatewayError | None = None
    cached: bool = False
    # The caller's own x-request-id, kept for correlation only (ours is the idempotency key).
    client_request_id: str = ""

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def fail(self, error: GatewayError, *, status: int | None = None) -> None:
        """Record the failure that ends this request (the last one wins)."""
        self.error = error
        self.status_code = status if status is not None else error.status
        if not self.end_reason:
            self.end_reason = "refused" if self.reservation is None else "upstream_error"

    def to_event(self) -> UsageEvent:
        principal = self.principal or Principal()
        settlement = self.settlement or SettleResponse()
        error = self.error
        return UsageEvent(
            event_id=self.request_id,
            occurred_at_ms=self.occurred_at_ms,
            key_id=principal.key_id,
            user_id=principal.user_id,
            model=self.model,
            upstream_model=self.upstream_model,
            channel_id=self.channel_id,
            endpoint=self.endpoint,
            stream=self.stream,
            status_code=self.status_code,
            usage=self.usage or Usage(),
            cost_micros=settlement.charged_micros,
            price_id=settlement.price_id,
            reservation_id=self.reservation.reservation_id if self.reservation else "",
            latency_ms=int(self.elapsed_s() * 1000),
            ttfb_ms=int(self.ttfb_s * 1000),
            upstream_ms=int(self.upstream_s * 1000),
            end_reason=self.end_reason,
            error_type=error.fault if error else "",
            error_code=error.code if error else "",
            attempts=self.attempts,
            client_ip=self.client_ip,
            cached=self.cached,
        )


class Meter:
    """Reserve / settle / release over gRPC, and publication of the usage event."""

    def __init__(
        self, stub: QuotaServiceAsyncStub, publisher: EventPublisher | None, *, rpc_timeout_s: float
    ) -> None:
        self._stub = stub
        self._publisher = publisher
        self._timeout = rpc_timeout_s

    async def reserve(
        self, exchange: Exchange, *, prompt_tokens: int, max_output_tokens: int, images: int = 0
    ) -> ReserveResponse:
        principal = exchange.principal
        assert principal is not None, "reserve needs an authenticated exchange"
        exchange.reservation = await call(
            self._stub.Reserve,
            ReserveRequest(
                reservation_id=exchange.request_id,
                key_id=principal.key_id,
                user_id=principal.user_id,
                model=exchange.model,
                prompt_tokens=prompt_tokens,
                max_output_tokens=max_output_tokens,
                images=images,
                key_limits=principal.key_limits,
                user_limits=principal.user_limits,
            ),
            timeout=self._timeout,
        )
        return exchange.reservation

    async def finish(self, exchange: Exchange) -> None:
        """Settle (usage known) or release (nothing to bill), publish the event, record metrics.

        Never raises: a failed settle is left to quota's expiry, which bills the hold rather than
        losing it."""
        reservation = exchange.reservation
        if reservation is not None:
            try:
                if exchange.usage is not None:
                    exchange.settlement = await call(
                        self._stub.Settle,
                        SettleRequest(reservation_id=reservation.reservation_id, usage=exchange.usage),
                        timeout=self._timeout,
                    )
                else:
                    exchange.settlement = await call(
                        self._stub.Release,
                        ReleaseRequest(reservation_id=reservation.reservation_id, reason=exchange.end_reason),
                        timeout=self._timeout,
                    )
            except GatewayError as exc:
                log.error(
                    "settling failed; quota will expire the hold",
                    extra={"reservation_id": reservation.reservation_id, "error": exc.message},
                )
        if self._publisher is not None and exchange.principal is not None:
            self._publisher.publish(exchange.to_event())
        self.observe(exchange)

    @staticmethod
    def observe(exchange: Exchange) -> None:
        """Metrics, and the log line of a failure, for one finished request."""
        error = exchange.error
        fault = error.fault if error is not None else ""
        metric(METRICS.http_requests, exchange.endpoint, str(exchange.status_code), fault).inc()
        elapsed = exchange.elapsed_s()
        metric(METRICS.http_latency, exchange.endpoint).observe(elapsed)
        metric(METRICS.gateway_overhead, exchange.endpoint).observe(max(0.0, elapsed - exchange.upstream_s))
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
