"""The streaming path: bytes from the upstream go to the client as they arrive, and the request is
settled when the upstream stream is over, whatever ended it.

Two tasks per stream, the detached-drain design: a *pump* reads the upstream into a bounded buffer
and owns the settlement; the request's own task *writes* that buffer to the client. So:

* **usage** is read from the stream as it passes (:class:`~services.relay.stream.sse.StreamScanner`); the
  upstream is always asked for ``stream_options.include_usage``, and the extra usage-only chunk is
  removed again when the caller did not ask for it. Nothing else is parsed or rewritten (a channel
  speaking another provider's format is decoded into OpenAI's chunks by its adapter instead, see
  :mod:`services.relay.providers`);
* **the front's sink** (:class:`~services.relay.stream.sink.StreamSink`) receives OpenAI's SSE bytes and
  puts them on the front's wire, converting them if the front speaks something else;
* **keep-alive**: while the upstream is silent the writer asks the sink for a sign of life every
  ``stream_keepalive_s`` (on HTTP an SSE comment), so idle proxies and load balancers keep the connection;
* **idle timeout**: the gap allowed between two upstream chunks (``stream_idle_timeout_s``), and the
  channel's total timeout for the whole stream; either ends it with an in-band error event;
* **client gone**: the pump keeps reading for at most ``stream_drain_s`` (no more than
  ``stream_max_drains`` streams at once) so the provider's usage report is still captured; if it
  never comes, a marked estimate is billed (quota caps it at the reservation);
* **end reason**, recorded in the usage event and ``relaygate_stream_end``: ``done`` (``[DONE]``
  seen), ``upstream_eof`` (ended without it), ``upstream_error``, ``timeout``, ``client_gone``.

Once the first byte is out the HTTP status is committed, so failures after it are sent in-band as an
OpenAI error event; failover to another channel happens only before (see
:mod:`services.relay.upstream.proxy`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from services.common import tracing
from services.common.errors import GatewayError, UpstreamError, UpstreamTimeout
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.telemetry import METRICS
from services.relay.meter.accounting import Meter, metric
from services.relay.meter.record import Exchange
from services.relay.providers import StreamDecoder, extensions
from services.relay.stream.sink import StreamSink
from services.relay.upstream.breaker import Outcome
from services.relay.upstream.channels import Channel
from services.relay.upstream.connections import wait
from services.relay.upstream.proxy import OpenStream, PayloadFor

log = logging.getLogger(__name__)

__all__ = ["StreamPolicy", "StreamRelay", "Streams", "stream_payload"]

# The pump stops reading while this much is waiting for a slow client.
_BUFFER_LIMIT = 1024 * 1024


def stream_payload(
    body: dict[str, Any], raw: bytes, *, max_output_tokens: int = 0
) -> tuple[PayloadFor, bool]:
    """What to send each channel, and whether the caller asked for the usage chunk itself.

    The caller's bytes go out unchanged when they already ask for usage and the channel keeps the
    model name; otherwise the body is re-serialized once per distinct upstream model. A channel of
    another format gets its provider's request (capped at ``max_output_tokens`` when the caller set
    no cap).
    """
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    model = body.get("model")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    built: dict[str, bytes] = {}
    # A body converted from another format with the chat extensions goes without them to the
    # channels that pass bodies through (their APIs refuse unknown fields); the caller's bytes hold them.
    plain = extensions.without_extensions(body) if extensions.MARK in body else None

    def payload_for(channel: Channel) -> bytes:
        upstream_model = channel.upstream_model(str(model))
        provider = channel.provider
        if provider is not None and provider.converts:
            return provider.request(body, upstream_model, stream=True, max_output_tokens=max_output_tokens)
        if wants_usage and upstream_model == model and plain is None:
            return raw
        payload = built.get(upstream_model)
        if payload is None:
            payload = built[upstream_model] = orjson.dumps(
                {**(body if plain is None else plain), "model": upstream_model, "stream_options": merged}
            )
        return payload

    return payload_for, wants_usage


class StreamPolicy:
    """The stream settings, from :class:`~services.relay.settings.RelaySettings`."""

    def __init__(self, *, idle_timeout_s: float, keepalive_s: float, drain_s: float, max_drains: int) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self.drain_s = drain_s
        self.max_drains = max_drains


class Streams:
    """Every stream's pump, so shutdown can wait for their settlements; owned by the lifespan."""

    def __init__(self, policy: StreamPolicy) -> None:
        self.policy = policy
        self._pumps: set[asyncio.Task[None]] = set()
        self.draining = 0

    def track(self, task: asyncio.Task[None]) -> None:
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

    @property
    def active(self) -> int:
        return len(self._pumps)

    async def close(self, *, timeout: float) -> None:
        """Let running streams finish and settle (bounded by ``timeout``), then cut the rest."""
        if not self._pumps:
            return
        _, pending = await asyncio.wait(set(self._pumps), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("streams cut at shutdown", extra={"streams": len(pending)})
            await asyncio.wait(pending, timeout=5.0)


class StreamRelay:
    """Relays one opened upstream stream to the client; see the module docstring."""

    def __init__(
        self,
        *,
        streams: Streams,
        meter: Meter,
        exchange: Exchange,
        opened: OpenStream,
        scanner: StreamDecoder,
        prompt_tokens: int,
        error_event: Callable[[GatewayError], bytes],
    ) -> None:
        self._streams = streams
        self._meter = meter
        self._exchange = exchange
        self._opened = opened
        self._scanner = scanner
        self._prompt_tokens = prompt_tokens
        # How the front writes an error in-band once the stream has started (its own wire format).
        self._error_event = error_event
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._finished = False
        self._client_gone = False
        self._writer_waiter: asyncio.Future[None] | None = None
        self._pump_waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.Timeout | None = None
        # Loop time by which a stream whose client left must be done draining.
        self._drain_until: float | None = None
        self._draining = False

    async def run(self, sink: StreamSink) -> None:
        """Start the front's response and relay the stream into ``sink`` until it ends or the client
        leaves; the pump may go on draining after this returns."""
        loop = asyncio.get_running_loop()
        pump = loop.create_task(
            tracing.in_span("relay.stream", self._pump(), self._span_attributes),
            name=f"stream-{self._exchange.request_id}",
        )
        self._streams.track(pump)
        watcher = loop.create_task(self._watch(sink))
        try:
            await sink.start()
            await self._write(sink)
        finally:
            watcher.cancel()
            if not self._finished:
                # The writer stopped early (client gone, or this task was cancelled): drain instead.
                self._leave()

    async def _write(self, sink: StreamSink) -> None:
        queue = self._queue
        first = True
        keepalive = self._streams.policy.keepalive_s
        while True:
            if queue:
                data = queue[0] if len(queue) == 1 else b"".join(queue)
                queue.clear()
                self._queued = 0
                self._wake_pump()
                await sink.write(data)
                if first:
                    first = False
                    self._meter.first_byte(self._exchange)
                continue
            if self._finished or self._client_gone:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._writer_waiter = waiter
            try:
                await wait(waiter, keepalive)
            except TimeoutError:
                await sink.keepalive()
            finally:
                self._writer_waiter = None
        if not self._client_gone:
            await sink.finish()

    async def _watch(self, sink: StreamSink) -> None:
        """Notice the client going away."""
        await sink.closed()
        self._leave()

    def _span_attributes(self) -> dict[str, str | int | float]:
        """What the stream's span ends with (it spans the pump: the drain and the settlement too)."""
        exchange = self._exchange
        return {
            "relaygate.stream.end_reason": exchange.end_reason,
            "relaygate.stream.chunks": self._scanner.events,
            "relaygate.stream.first_byte_ms": round(exchange.first_byte_s * 1000, 3),
        }

    def _leave(self) -> None:
        """The client is gone: bound the rest of the pump's work to the drain window."""
        if self._client_gone:
            return
        self._client_gone = True
        self._queue.clear()
        self._wake_writer()
        self._wake_pump()
        if self._finished:
            return
        streams = self._streams
        drain_s = streams.policy.drain_s if streams.draining < streams.policy.max_drains else 0.0
        if drain_s > 0:
            self._draining = True
            streams.draining += 1
            METRICS.stream_drains.set(streams.draining)
        self._drain_until = asyncio.get_running_loop().time() + drain_s
        self._shorten_deadline()

    def _shorten_deadline(self) -> None:
        deadline, until = self._deadline, self._drain_until
        if deadline is not None and until is not None:
            current = deadline.when()
            deadline.reschedule(until if current is None else min(current, until))

    async def _pump(self) -> None:
        exchange = self._exchange
        opened = self._opened
        scanner = self._scanner
        reason = ""
        error: GatewayError | None = None
        try:
            async with asyncio.timeout(
                max(0.0, opened.channel.total_timeout_s - exchange.ttfb_s)
            ) as deadline:
                self._deadline = deadline
                self._shorten_deadline()
                async for data in opened.body:
                    out = scanner.feed(data)
                    if out and not self._client_gone:
                        self._push(out)
                        if self._queued > _BUFFER_LIMIT:
                            await self._wait_for_room()
                tail = scanner.flush()
                if tail and not self._client_gone:
                    self._push(tail)
            reason = "done" if scanner.done else "upstream_eof"
        except TimeoutError:
            if self._client_gone:
                reason = "client_gone"
            else:
                reason = "timeout"
                error = UpstreamTimeout(f"Channel {opened.channel.name!r} exceeded its total timeout.")
        except httpx.TimeoutException:
            reason = "timeout"
            error = UpstreamTimeout(f"Channel {opened.channel.name!r} went silent mid-stream.")
        except httpx.HTTPError as exc:
            reason = "upstream_error"
            error = UpstreamError(f"Channel {opened.channel.name!r} broke the stream: {type(exc).__name__}.")
        except asyncio.CancelledError:
            reason = "client_gone" if self._client_gone else "upstream_error"
            error = None if self._client_gone else UpstreamError("The stream was cut at shutdown.")
            raise
        finally:
            await self._finish(reason, error)

    async def _finish(self, reason: str, error: GatewayError | None) -> None:
        exchange = self._exchange
        opened = self._opened
        if self._client_gone and reason in ("done", "upstream_eof"):
            reason = "client_gone"
        with contextlib.suppress(httpx.HTTPError):
            await opened.body.aclose()
        if error is not None:
            exchange.fail(error, status=exchange.status_code)
            if not self._client_gone:
                # The channel answered and then broke: like a 5xx answer, one caller's body may be
                # the cause, so it counts against the channel only once several keys see it.
                key = exchange.principal.key_id if exchange.principal is not None else ""
                opened.breaker.record(Outcome.FAILURE, answered_by_status=key)
                self._push(self._error_event(error))
        scanner = self._scanner
        exchange.stream_ended(
            reason,
            scanner.usage
            or Usage(prompt_tokens=self._prompt_tokens, completion_tokens=scanner.events, estimated=True),
        )
        self._finished = True
        self._wake_writer()
        if self._draining:
            self._streams.draining -= 1
            METRICS.stream_drains.set(self._streams.draining)
        metric(METRICS.stream_end, reason).inc()
        metric(METRICS.stream_duration, exchange.front, exchange.endpoint).observe(exchange.elapsed_s())
        await self._meter.finish(exchange)

    def _push(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued += len(data)
        self._wake_writer()

    async def _wait_for_room(self) -> None:
        while self._queued > _BUFFER_LIMIT and not self._client_gone:
            waiter = asyncio.get_running_loop().create_future()
            self._pump_waiter = waiter
            try:
                await waiter
            finally:
                self._pump_waiter = None

    def _wake_writer(self) -> None:
        waiter = self._writer_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_pump(self) -> None:
        waiter = self._pump_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
