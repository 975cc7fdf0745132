"""The record of one request, and the only place its usage event is built.

A front (today the HTTP edge) opens the record with :meth:`Exchange.begin` and the layers under it
feed it as the request goes: the pipeline (model, principal, plan), the upstream client (channel,
attempts, time to first byte), the stream pump (end reason, usage) and the meter (hold, price,
charge). :meth:`Exchange.to_event` turns it into the ``UsageEvent`` that settles and logs the
request; :func:`refusals_summary` is the one other event the relay writes, standing for refusals
held back under a flood (:mod:`services.relay.meter.refusals`). Nothing else assembles a
``UsageEvent``, so a field added to the event is filled here once, for every front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.common import pricing, tracing
from services.common.errors import GatewayError
from services.common.ids import new_id
from services.common.pb.relaygate.auth.v1.auth_pb2 import Principal
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.common.pb.relaygate.quota.v1.quota_pb2 import ReserveResponse, SettleResponse
from services.common.telemetry import request_id_var
from services.relay.meter.credit import Admission

__all__ = ["Exchange", "refusals_summary"]

# The caller's own x-request-id is kept for correlation, bounded so a caller cannot bloat the log.
_CLIENT_REQUEST_ID_CHARS = 200


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
    # Completions asked for (OpenAI's n): the reservation holds the output cap once per choice.
    choices: int = 1
    reservation: ReserveResponse | None = None
    settlement: SettleResponse | None = None
    # Admitted on a lease instead of a reservation: the admission (None again once it is over). On a
    # lease or a reservation settled by its event: the price it was held at and what the event charges.
    admission: Admission | None = None
    price: pricing.Price | None = None
    lease_id: str = ""
    charged_micros: int = 0
    channel_id: str = ""
    upstream_model: str = ""
    status_code: int = 0
    usage: Usage | None = None
    upstream_s: float = 0.0
    ttfb_s: float = 0.0
    # Seconds from arrival to the first byte written to a streaming client (0 until then).
    first_byte_s: float = 0.0
    attempts: int = 0
    end_reason: str = ""
    error: GatewayError | None = None
    cached: bool = False
    # The caller's own x-request-id, kept for correlation only (ours is the idempotency key).
    client_request_id: str = ""
    # Which front the caller used: "http" or "grpc".
    front: str = ""
    # The trace the front opened for the request ("" while tracing is off).
    trace_id: str = ""

    @classmethod
    def begin(
        cls,
        *,
        endpoint: str,
        client_ip: str,
        client_request_id: str = "",
        front: str = "http",
        arrived: float | None = None,
    ) -> Exchange:
        """The record of a request that has just arrived (at ``arrived`` on ``time.perf_counter``'s
        clock when the front knows, else now), under a new request id (also the id of the log lines
        written while it is served)."""
        request_id = new_id("req")
        request_id_var.set(request_id)
        tracing.annotate("relaygate.request_id", request_id)
        return cls(
            request_id=request_id,
            endpoint=endpoint,
            client_ip=client_ip,
            client_request_id=client_request_id[:_CLIENT_REQUEST_ID_CHARS],
            front=front,
            trace_id=tracing.current_trace_id(),
            started=time.perf_counter() if arrived is None else arrived,
        )

    def answered(self, *, channel_id: str, upstream_model: str, status: int) -> None:
        """The channel that answered, under which model name, and the status it answered with."""
        self.channel_id = channel_id
        self.upstream_model = upstream_model
        self.status_code = status

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def fail(self, error: GatewayError, *, status: int | None = None) -> None:
        """Record the failure that ends this request (the last one wins)."""
        self.error = error
        self.status_code = status if status is not None else error.status
        if not self.end_reason:
            self.end_reason = "refused" if not self.held else "upstream_error"

    @property
    def held(self) -> bool:
        """Credit was held for this request: a reservation, or an admission on a lease."""
        return self.reservation is not None or bool(self.lease_id)

    def to_event(self) -> UsageEvent:
        principal = self.principal or Principal()
        settlement = self.settlement or SettleResponse()
        cost_micros, price_id = settlement.charged_micros, settlement.price_id
        if self.price is not None:
            cost_micros, price_id = self.charged_micros, self.price.price_id
        # A reservation's event without usage releases its hold (nothing was delivered).
        usage = self.usage if self.usage is not None or self.reservation is not None else Usage()
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
            usage=usage,
            cost_micros=cost_micros,
            price_id=price_id,
            reservation_id=self.reservation.reservation_id if self.reservation else "",
            lease_id=self.lease_id,
            latency_ms=int(self.elapsed_s() * 1000),
            ttfb_ms=int(self.ttfb_s * 1000),
            upstream_ms=int(self.upstream_s * 1000),
            end_reason=self.end_reason,
            error_type=error.fault if error else "",
            error_code=error.code if error else "",
            attempts=self.attempts,
            client_ip=self.client_ip,
            cached=self.cached,
            front=self.front,
            trace_id=self.trace_id,
        )


def refusals_summary(last: UsageEvent, *, event_id: str, second: int, count: int) -> UsageEvent:
    """One event standing for ``count`` refusals of wall-clock ``second`` made before their key was
    known, described by the ``last`` of them."""
    return UsageEvent(
        event_id=event_id,
        occurred_at_ms=second * 1000,
        model=last.model,
        endpoint=last.endpoint,
        stream=last.stream,
        status_code=last.status_code,
        end_reason=last.end_reason,
        error_type=last.error_type,
        error_code=last.error_code,
        client_ip=last.client_ip,
        latency_ms=last.latency_ms,
        aggregated=count,
    )
