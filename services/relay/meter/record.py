"""The record of one request, and the only place its usage event is built.

A front (the HTTP edge, or the gRPC front with ``front="grpc"``) opens the record with
:meth:`Exchange.begin`, and the layers under it tell it what happened as the request goes, each
through a method named for the event: the pipeline (the model asked for, the plan, the principal,
the answer delivered), the upstream client (each attempt on a channel, the time to its answer, the
time spent upstream), the stream pump (how the stream ended and what it used) and the meter (the
credit held, the first byte out, the charge or settlement). Only this module sets the record's
fields (``tests/relay/test_layers.py`` checks it), so what each event means is decided here once.
:meth:`Exchange.to_event` turns the record into the ``UsageEvent`` that settles and logs the
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

    # --- what the pipeline learns ---------------------------------------------------------------------

    def asked_for(self, model: str) -> None:
        """The model the caller named (known before the rest of the body is checked)."""
        self.model = model

    def planned(self, *, stream: bool, choices: int) -> None:
        """What the checked body asks for: a stream or not, and how many completions."""
        self.stream = stream
        self.choices = choices

    def authenticated(self, principal: Principal) -> None:
        """The key was verified: whose request this is."""
        self.principal = principal

    def delivered(self, usage: Usage, *, status: int | None = None) -> None:
        """A complete answer is ready for the caller, using ``usage`` (``status`` when no channel's
        :meth:`answered` gave one: an answer from the response cache)."""
        self.usage = usage
        self.end_reason = "done"
        if status is not None:
            self.status_code = status

    def from_cache(self) -> None:
        """The response cache holds the answer: no channel is called."""
        self.cached = True

    def cancelled(self) -> None:
        """The front's task was cancelled before the request finished: nothing counts as delivered."""
        self.usage = None

    # --- what the upstream client learns --------------------------------------------------------------

    def attempt(self, channel_id: str) -> int:
        """An attempt on ``channel_id`` begins; returns its number (1 for the first)."""
        self.attempts += 1
        self.channel_id = channel_id
        return self.attempts

    def upstream_responded(self, ttfb_s: float) -> None:
        """The attempt's upstream answered (its status and headers) ``ttfb_s`` after it was sent."""
        self.ttfb_s = ttfb_s

    def waited_upstream(self, seconds: float) -> None:
        """``seconds`` more spent on an upstream attempt (every attempt's time adds up)."""
        self.upstream_s += seconds

    def answered(self, *, channel_id: str, upstream_model: str, status: int, complete: bool = False) -> None:
        """The channel that answered, under which model name, and the status it answered with;
        ``complete``: its whole answer is in (not a stream still to relay), so the upstream's part
        ended ``done`` whatever becomes of the answer here."""
        self.channel_id = channel_id
        self.upstream_model = upstream_model
        self.status_code = status
        if complete:
            self.end_reason = "done"

    # --- what the stream pump learns ------------------------------------------------------------------

    def stream_ended(self, reason: str, usage: Usage) -> None:
        """The upstream stream is over (``reason``: done, upstream_eof, timeout, ...), having used
        ``usage``; the whole stream counts as upstream time."""
        self.end_reason = reason
        self.upstream_s = self.elapsed_s()
        self.usage = usage

    # --- what the meter learns ------------------------------------------------------------------------

    def reserved(self, reservation: ReserveResponse) -> None:
        """Quota holds the request's worst case under ``reservation``."""
        self.reservation = reservation

    def admitted(self, admission: Admission, price: pricing.Price) -> None:
        """The request's worst case is held on a lease, priced at ``price``."""
        self.admission = admission
        self.lease_id = admission.lease_id
        self.price = price

    def lease_finished(self, charged_micros: int) -> None:
        """The lease admission is over (finished once: it is off the record now) and the usage event
        charges ``charged_micros`` at the price it was admitted at."""
        self.admission = None
        self.charged_micros = charged_micros

    def charged(self, price: pricing.Price, micros: int) -> None:
        """The reservation's usage costs ``micros`` at ``price`` (the price quota held it at): what the
        event that settles it charges."""
        self.price = price
        self.charged_micros = micros

    def settled(self, settlement: SettleResponse | None) -> None:
        """Quota answered the settlement (or release) RPC; None when it never did (the hold expires)."""
        self.settlement = settlement

    def wrote_first_byte(self) -> float:
        """The first byte of a stream reached the client; returns the seconds since arrival."""
        self.first_byte_s = seconds = self.elapsed_s()
        return seconds

    # --- how it ends, from any layer ------------------------------------------------------------------

    def fail(self, error: GatewayError, *, status: int | None = None) -> None:
        """Record the failure that ends this request (the last one wins)."""
        self.error = error
        self.status_code = status if status is not None else error.status
        if not self.end_reason:
            self.end_reason = "refused" if not self.held else "upstream_error"

    # --- reading --------------------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

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
