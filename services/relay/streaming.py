"""The streaming path: bytes from the upstream go to the client as they arrive, and the request is
settled in the stream's ``finally`` whatever ended it.

The upstream is always asked for ``stream_options.include_usage`` so the bill uses the provider's
own count; the extra usage chunk is removed again when the caller did not ask for it. When the client
goes away the upstream is drained (bounded by ``_DRAIN_S``) under a shielded scope, so the usage that
arrives after the disconnect is still captured and settled.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
from starlette.responses import Response, StreamingResponse

from services.common.errors import GatewayError, UpstreamError, UpstreamStatus, UpstreamTimeout
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.telemetry import METRICS
from services.relay.accounting import Exchange
from services.relay.channels import Channel
from services.relay.deps import Gateway
from services.relay.openai_errors import error_response, sse_error
from services.relay.proxy import _RETRYABLE_STATUS, build_headers, map_upstream_errors
from services.relay.sse import StreamScanner

_DRAIN_S = 10.0


def _stream_payload(body: dict[str, Any], model: str) -> tuple[bytes, bool]:
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps({**body, "model": model, "stream_options": merged}), wants_usage


async def _open(
    gateway: Gateway, exchange: Exchange, body: dict[str, Any], path: str, candidates: list[Channel]
) -> tuple[httpx.Response, Channel, bool]:
    """Send to channels in order until one starts a 2xx stream; non-retryable answers raise."""
    client = gateway.upstreams.client
    last_error: GatewayError = UpstreamError("No channel could be tried.")
    for channel in candidates[: gateway.upstreams.max_attempts]:
        exchange.attempts += 1
        payload, wants_usage = _stream_payload(body, channel.upstream_model(exchange.model))
        request = client.build_request(
            "POST",
            f"{channel.base_url}{path}",
            content=payload,
            headers=build_headers(channel, exchange.request_id),
            timeout=httpx.Timeout(
                connect=channel.connect_timeout_s,
                read=channel.first_byte_timeout_s,
                write=channel.connect_timeout_s,
                pool=channel.connect_timeout_s,
            ),
        )
        started = time.perf_counter()
        try:
            with map_upstream_errors(channel):
                response = await client.send(request, stream=True)
        except UpstreamError as exc:
            METRICS.upstream_attempts.labels(
                channel=channel.name, outcome="timeout" if isinstance(exc, UpstreamTimeout) else "transport"
            ).inc()
            last_error = exc
            continue
        exchange.ttfb_s = time.perf_counter() - started
        METRICS.upstream_ttfb.labels(channel=channel.name).observe(exchange.ttfb_s)
        if 200 <= response.status_code < 300:
            METRICS.upstream_attempts.labels(channel=channel.name, outcome="ok").inc()
            return response, channel, wants_usage
        content = await response.aread()
        await response.aclose()
        METRICS.upstream_attempts.labels(channel=channel.name, outcome=f"status_{response.status_code}").inc()
        error = UpstreamStatus(status=response.status_code, body=content)
        if response.status_code not in _RETRYABLE_STATUS:
            raise error
        last_error = error
    raise last_error


async def relay_stream(
    gateway: Gateway,
    exchange: Exchange,
    body: dict[str, Any],
    path: str,
    candidates: list[Channel],
    *,
    prompt_tokens: int,
    max_output_tokens: int,
) -> Response:
    try:
        await gateway.meter.reserve(
            exchange, prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens
        )
        upstream, channel, wants_usage = await _open(gateway, exchange, body, path, candidates)
    except GatewayError as exc:
        exchange.error = exc
        exchange.status_code = exc.status
        exchange.end_reason = "refused" if exchange.reservation is None else "upstream_error"
        await gateway.meter.finish(exchange)
        if isinstance(exc, UpstreamStatus) and exc.status < 500 and exc.status != 429:
            return error_response(exc, request_id=exchange.request_id)
        raise
    exchange.channel_id = channel.id
    exchange.upstream_model = channel.upstream_model(exchange.model)
    exchange.status_code = upstream.status_code
    scanner = StreamScanner(strip_usage_chunk=not wants_usage)

    async def events() -> AsyncIterator[bytes]:
        exchange.end_reason = "client_gone"
        try:
            async for data in upstream.aiter_raw():
                for event in scanner.feed(data):
                    yield event
            tail = scanner.flush()
            if tail:
                yield tail
            exchange.end_reason = "done" if scanner.done else "upstream_eof"
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            exchange.end_reason = "timeout" if isinstance(exc, httpx.TimeoutException) else "upstream_error"
            exchange.error = UpstreamTimeout() if exchange.end_reason == "timeout" else UpstreamError()
            yield sse_error(exchange.error)
        finally:
            with anyio.CancelScope(shield=True):
                if exchange.end_reason == "client_gone":
                    await _drain(upstream, scanner)
                await upstream.aclose()
                exchange.upstream_s = exchange.elapsed_s()
                exchange.usage = scanner.usage or _estimate(prompt_tokens, scanner)
                await gateway.meter.finish(exchange)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"x-request-id": exchange.request_id, "cache-control": "no-cache"},
    )


async def _drain(upstream: httpx.Response, scanner: StreamScanner) -> None:
    """Read the rest of an abandoned stream (bounded) so provider-reported usage is not lost."""
    with anyio.move_on_after(_DRAIN_S):
        try:
            async for data in upstream.aiter_raw():
                for _ in scanner.feed(data):
                    pass
        except (httpx.TimeoutException, httpx.TransportError):
            pass


def _estimate(prompt_tokens: int, scanner: StreamScanner) -> Usage:
    """A marked estimate when the provider reported nothing: quota caps it at the reservation."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=scanner.events, estimated=True)
