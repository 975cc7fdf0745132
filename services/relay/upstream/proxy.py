"""Sending a request upstream through the channel pools, with failover and circuit breakers.

Which failures may go to the next channel: connect errors, timeouts, dropped connections, 5xx, 429,
and 401/403 (the channel's own credentials were refused; the caller's key was already checked by us).
Anything else the upstream answers (400, 404, 422, ...) is returned as is and never retried. httpx
exceptions are mapped to the gateway's error tree here and nowhere else.

Timeouts per attempt: connect (also bounds waiting for a pooled connection), first byte (the response
headers), and total (the whole non-streaming exchange; a stream's total is enforced by the stream).
Channels whose breaker is open are skipped without counting as an attempt; when every candidate is
skipped the request fails at once with 503 and a ``Retry-After`` of the soonest reopening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpcore
import httpx

from services.common import tracing
from services.common.errors import (
    GatewayError,
    InvalidRequest,
    NoUpstreamAvailable,
    ServiceUnavailable,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from services.common.telemetry import METRICS
from services.relay.meter.accounting import metric
from services.relay.meter.record import Exchange
from services.relay.upstream.breaker import Breaker, Breakers, Outcome
from services.relay.upstream.channels import Channel, Timeouts
from services.relay.upstream.pools import ChannelPools
from services.relay.upstream.transport import ChannelTransport, UpstreamBody

log = logging.getLogger(__name__)

# Answers worth another channel. 401/403 mean the channel's credentials were refused.
RETRYABLE_STATUS = frozenset({401, 403, 408, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
# Overload: the provider asks for patience; the breaker pauses the channel instead of counting a failure.
_OVERLOAD_STATUS = frozenset({429, 529})
_CREDENTIALS_STATUS = frozenset({401, 403})

PayloadFor = Callable[[Channel], bytes]


class UpstreamRejected(InvalidRequest):
    """The upstream refused the request itself (a 400, 404, 422, ...): the caller's mistake, passed
    through with the upstream's status and body, never retried."""

    code = "upstream_rejected"

    def __init__(self, *, status: int, body: bytes) -> None:
        super().__init__(f"The upstream refused the request (status {status}).")
        self.upstream_status = status
        self.body = body

    @property
    def status(self) -> int:
        return self.upstream_status


class PoolExhausted(ServiceUnavailable):
    """No connection of our own pool became free in time: the gateway's capacity, not the channel's."""

    code = "upstream_pool_exhausted"


@contextlib.contextmanager
def map_upstream_errors(channel: Channel) -> Iterator[None]:
    """Turn httpx failures (and a total deadline) into the most specific :class:`UpstreamError`."""
    try:
        yield
    except httpx.PoolTimeout as exc:
        raise PoolExhausted(f"No connection to channel {channel.name!r} became free in time.") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"Channel {channel.name!r} timed out ({type(exc).__name__}).") from exc
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Channel {channel.name!r} exceeded its total timeout.") from exc
    except httpx.TransportError as exc:
        raise UpstreamError(f"Channel {channel.name!r} failed: {type(exc).__name__}.") from exc


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower case) among raw response headers."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def retry_after_s(headers: list[tuple[bytes, bytes]]) -> float | None:
    value = header(headers, b"retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from APIs; the default pause applies


def classify(status: int, headers: list[tuple[bytes, bytes]]) -> Outcome:
    if status in _OVERLOAD_STATUS or (status == 503 and header(headers, b"retry-after") is not None):
        return Outcome.OVERLOAD
    if status >= 500 or status in _CREDENTIALS_STATUS:
        return Outcome.FAILURE
    return Outcome.SUCCESS


def caller_of(exchange: Exchange, status: int) -> str | None:
    """The key a 5xx answer went to, for the breaker: such an answer may be caused by one caller's
    body rather than by the channel (connect errors, timeouts and refused credentials never are)."""
    if status < 500:
        return None
    principal = exchange.principal
    return principal.key_id if principal is not None else ""


def status_error(channel: Channel, status: int, body: bytes) -> GatewayError:
    """The error for a final non-2xx answer: not retryable, or out of channels to retry on. A
    converting channel's error body is put in OpenAI's shape here, once."""
    if channel.provider is not None and channel.provider.converts:
        status, body = channel.provider.error(status, body)
    if status in _CREDENTIALS_STATUS:
        # Passing a 401 through would tell the caller their own (valid) key is wrong.
        return UpstreamError(f"The upstream refused the channel's credentials (status {status}).")
    if status < 500 and status not in RETRYABLE_STATUS:
        return UpstreamRejected(status=status, body=body)
    return UpstreamStatus(status=status, body=body)


@dataclass(slots=True)
class Reply:
    """A complete 2xx non-streaming answer."""

    channel: Channel
    status: int
    content_type: bytes
    body: bytes


@dataclass(slots=True)
class OpenStream:
    """A 2xx streaming answer whose body is still to be read."""

    channel: Channel
    breaker: Breaker
    response: httpcore.Response
    body: UpstreamBody
    timeouts: Timeouts


class Upstreams:
    """Failover across a request's candidate channels; owned by the relay's lifespan."""

    def __init__(self, pools: ChannelPools, breakers: Breakers, *, max_attempts: int) -> None:
        self.pools = pools
        self.breakers = breakers
        self.max_attempts = max_attempts

    def _request(
        self, channel: Channel, target: bytes, payload: bytes, request_id: bytes, timeouts: Timeouts
    ) -> tuple[ChannelTransport, httpcore.Request]:
        transport = self.pools.get(channel)
        request = httpcore.Request(
            b"POST",
            transport.url(target),
            headers=[
                *channel.raw_headers,
                (b"content-length", b"%d" % len(payload)),
                (b"x-request-id", request_id),
            ],
            content=payload,
            extensions={"timeout": timeouts},
        )
        return transport, request

    def _eligible(self, exchange: Exchange, candidates: list[Channel]) -> Iterator[tuple[Channel, Breaker]]:
        """Candidates whose breaker lets a request through, up to ``max_attempts``; raises
        :class:`NoUpstreamAvailable` when none did."""
        tried = 0
        soonest: float | None = None
        for channel in candidates:
            if tried >= self.max_attempts:
                return
            breaker = self.breakers.get(channel.id, channel.name)
            if not breaker.allow():
                wait = breaker.retry_in()
                soonest = wait if soonest is None else min(soonest, wait)
                continue
            tried += 1
            attempt = exchange.attempt(channel.id)
            # The attempt's span is current while the caller's loop body runs for this channel.
            with tracing.attempt(channel.id, channel.name, attempt):
                yield channel, breaker
        if not tried:
            raise NoUpstreamAvailable(
                f"Every channel serving '{exchange.model}' is unavailable right now; retry shortly.",
                retry_after=max(1.0, soonest or 1.0),
            )

    async def post_json(
        self, exchange: Exchange, candidates: list[Channel], path: bytes, payload_for: PayloadFor
    ) -> Reply:
        """POST and read the whole 2xx answer of the first channel that gives one.

        A non-retryable status raises its error at once (:class:`UpstreamRejected` for the caller's
        own mistakes, passed through); the last failure is raised when every attempt failed.
        """
        last: GatewayError | None = None
        request_id = exchange.request_id.encode()
        for channel, breaker in self._eligible(exchange, candidates):
            started = time.perf_counter()
            # Stays ABANDONED when the attempt is cancelled (the client left): no verdict on the channel.
            verdict = Outcome.ABANDONED
            retry_after: float | None = None
            answered_by: str | None = None
            try:
                try:
                    with map_upstream_errors(channel):
                        async with asyncio.timeout(channel.total_timeout_s):
                            transport, request = self._request(
                                channel,
                                channel.target(path, exchange.model, stream=False),
                                payload_for(channel),
                                request_id,
                                channel.timeouts(),
                            )
                            response, body = await transport.open(request)
                            ttfb_s = time.perf_counter() - started
                            exchange.upstream_responded(ttfb_s)
                            try:
                                content = b"".join([part async for part in body])
                            finally:
                                await body.aclose()
                except (UpstreamError, PoolExhausted) as exc:
                    if not isinstance(exc, PoolExhausted):
                        verdict = Outcome.FAILURE
                    self._attempt_failed(channel, exc)
                    last = exc
                    continue
                verdict = classify(response.status, response.headers)
                if verdict is Outcome.OVERLOAD:
                    retry_after = retry_after_s(response.headers)
                answered_by = caller_of(exchange, response.status)
            finally:
                exchange.waited_upstream(time.perf_counter() - started)
                breaker.record(verdict, retry_after=retry_after, answered_by_status=answered_by)
            status = response.status
            tracing.attempt_answered(status, ttfb_s)
            metric(METRICS.upstream_ttfb, channel.name).observe(ttfb_s)
            metric(
                METRICS.upstream_attempts, channel.name, "ok" if status < 300 else f"status_{status}"
            ).inc()
            if 200 <= status < 300:
                return Reply(channel, status, header(response.headers, b"content-type") or b"", content)
            last = status_error(channel, status, content)
            if status not in RETRYABLE_STATUS:
                raise last
        assert last is not None
        raise last

    async def open_stream(
        self,
        exchange: Exchange,
        candidates: list[Channel],
        path: bytes,
        payload_for: PayloadFor,
        *,
        idle_timeout_s: float,
    ) -> OpenStream:
        """Send to channels in order until one starts a 2xx stream (headers received).

        A non-retryable status raises its error at once; the last failure is raised when every
        attempt failed. The returned body must be closed by the caller.
        """
        last: GatewayError | None = None
        request_id = exchange.request_id.encode()
        for channel, breaker in self._eligible(exchange, candidates):
            started = time.perf_counter()
            # One dict per attempt: its "read" entry is lowered to the idle timeout once headers are in.
            timeouts = channel.timeouts()
            try:
                with map_upstream_errors(channel):
                    async with asyncio.timeout(channel.total_timeout_s):
                        transport, request = self._request(
                            channel,
                            channel.target(path, exchange.model, stream=True),
                            payload_for(channel),
                            request_id,
                            timeouts,
                        )
                        response, body = await transport.open(request)
            except (UpstreamError, PoolExhausted) as exc:
                exchange.waited_upstream(time.perf_counter() - started)
                self._attempt_failed(channel, exc)
                breaker.record(Outcome.ABANDONED if isinstance(exc, PoolExhausted) else Outcome.FAILURE)
                last = exc
                continue
            except BaseException:
                breaker.record(Outcome.ABANDONED)
                raise
            ttfb_s = time.perf_counter() - started
            exchange.upstream_responded(ttfb_s)
            metric(METRICS.upstream_ttfb, channel.name).observe(ttfb_s)
            status = response.status
            tracing.attempt_answered(status, ttfb_s)
            outcome = classify(status, response.headers)
            breaker.record(
                outcome,
                retry_after=retry_after_s(response.headers) if outcome is Outcome.OVERLOAD else None,
                answered_by_status=caller_of(exchange, status),
            )
            metric(
                METRICS.upstream_attempts, channel.name, "ok" if status < 300 else f"status_{status}"
            ).inc()
            if 200 <= status < 300:
                timeouts["read"] = idle_timeout_s
                return OpenStream(channel, breaker, response, body, timeouts)
            try:
                with map_upstream_errors(channel):
                    content = b"".join([part async for part in body])
            except UpstreamError:
                content = b""
            finally:
                await body.aclose()
                exchange.waited_upstream(time.perf_counter() - started)
            error = status_error(channel, status, content)
            if status not in RETRYABLE_STATUS:
                raise error
            last = error
        assert last is not None
        raise last

    def status(self, channels: list[Channel]) -> list[dict[str, object]]:
        """What this relay process knows of each channel: breaker and pool (for an admin view)."""
        found: list[dict[str, object]] = []
        for channel in channels:
            breaker = self.breakers.find(channel.id)
            stats = self.pools.stats(channel.id)
            found.append(
                {
                    "channel_id": channel.id,
                    "name": channel.name,
                    "breaker": breaker.state.name.lower() if breaker is not None else "closed",
                    "retry_in_s": round(breaker.retry_in(), 3) if breaker is not None else 0.0,
                    "connections": stats.connections if stats else 0,
                    "idle": stats.idle if stats else 0,
                    "in_flight": stats.in_flight if stats else 0,
                    "waiting": stats.waiting if stats else 0,
                }
            )
        return found

    @staticmethod
    def _attempt_failed(channel: Channel, exc: GatewayError) -> None:
        if isinstance(exc, PoolExhausted):
            outcome = "pool_exhausted"
        elif isinstance(exc, UpstreamTimeout):
            outcome = "timeout"
        else:
            outcome = "transport"
        metric(METRICS.upstream_attempts, channel.name, outcome).inc()
        tracing.attempt_failed(outcome, exc.message)
        log.warning(
            "upstream attempt failed",
            extra={"channel": channel.name, "error": exc.message, "fault": exc.fault},
        )
