"""Serving an inbound format other than OpenAI chat over HTTP: the caller's body is converted to a
chat body and served by the same pipeline as ``/v1/chat/completions`` (authentication, credit, channel
choice and failover, the response cache, logging under the format's own endpoint name), and the chat
answer, stream and errors are converted back (:mod:`services.relay.formats`).

A body the format refuses is refused before any RPC, in the format's error shape, and like any
refusal before an upstream call it is never charged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from services.common.errors import GatewayError
from services.relay.edge.http.headers import JSON, STREAM_HEADERS, RawHeaders
from services.relay.edge.http.requests import ClientGone, read_body
from services.relay.edge.http.routes import Call, begin, respond
from services.relay.edge.http.sse_sink import HttpSink
from services.relay.formats.stream_sink import ConvertingSink, StreamConverter
from services.relay.meter.facts import gateway_facts
from services.relay.meter.record import Exchange
from services.relay.pipeline import relay as pipeline
from services.relay.pipeline.checks import MAX_API_KEY_CHARS, bounded_credential, parse_json
from services.relay.pipeline.principals import extract_api_key
from services.relay.settings import RelaySettings
from services.relay.stream.streaming import StreamRelay

__all__ = ["Conversion", "ErrorRenderer", "InboundFormat", "read_request", "serve"]

log = logging.getLogger(__name__)

# Status, body and headers of the answer for an error, given the request id.
ErrorRenderer = Callable[[GatewayError, str], tuple[int, bytes, RawHeaders]]


class Conversion(Protocol):
    """How one request's chat answer goes back to the caller."""

    def answer(self, chat_answer: bytes) -> bytes: ...

    def stream(self) -> StreamConverter: ...


@dataclass(frozen=True, slots=True)
class InboundFormat:
    # The endpoint name in request logs and metrics.
    endpoint: str
    # The chat body for the caller's body (raises a 400 naming the field).
    to_chat: Callable[[dict[str, Any], RelaySettings], dict[str, Any]]
    # The conversion back, given the caller's body and the request's record.
    conversion: Callable[[dict[str, Any], Exchange], Conversion]
    error: ErrorRenderer


async def read_request(call: Call) -> tuple[str, dict[str, Any]]:
    """The caller's key and JSON body, within the relay's limits. A missing key is refused before
    the body is even read (either header, as on every route)."""
    api_key = bounded_credential(
        extract_api_key(call.incoming.authorization, call.incoming.x_api_key), MAX_API_KEY_CHARS
    )
    settings = call.gateway.settings
    raw = await read_body(call.receive, call.incoming.content_length, settings.max_body_bytes)
    return api_key, parse_json(raw, max_depth=settings.max_json_depth)


async def serve(call: Call, fmt: InboundFormat) -> None:
    """Serve one POST in ``fmt`` (see the module docstring)."""
    gateway = call.gateway
    exchange = begin(call, fmt.endpoint)
    try:
        api_key, body = await read_request(call)
        chat = fmt.to_chat(body, gateway.settings)
        conversion = fmt.conversion(body, exchange)
        request = await pipeline.admit(gateway, exchange, pipeline.CHAT, api_key, orjson.dumps(chat))
        if request.plan.stream:
            await _stream(call, exchange, request, conversion.stream())
        else:
            await _answer(call, exchange, request, conversion, fmt.error)
    except ClientGone:
        return
    except asyncio.CancelledError:
        pipeline.abandon(gateway, exchange)
        raise
    except GatewayError as exc:
        await _refuse(call, exchange, exc, fmt.error)
    except Exception:
        log.exception("unhandled error in %s", fmt.endpoint)
        if not call.started:
            await _refuse(call, exchange, GatewayError(), fmt.error)


async def _refuse(call: Call, exchange: Exchange, exc: GatewayError, render: ErrorRenderer) -> None:
    """Answer a failure that happened before any response byte: release, then the error."""
    await pipeline.refuse(call.gateway, exchange, exc)
    status, body, headers = render(exc, exchange.request_id)
    if exchange.held:
        headers.extend(gateway_facts(exchange)[1:])
    await respond(call.send, status, body, headers)


async def _answer(
    call: Call, exchange: Exchange, request: pipeline.Admitted, conversion: Conversion, render: ErrorRenderer
) -> None:
    answer = await pipeline.answer_json(call.gateway, exchange, request, cache_hint=call.incoming.cache)
    try:
        body = conversion.answer(answer.body)
    except GatewayError as exc:
        # Settled already (the provider answered and reported its usage): only the answer failed.
        status, error, headers = render(exc, exchange.request_id)
        await respond(call.send, status, error, headers)
        return
    await respond(call.send, answer.status, body, [JSON, *gateway_facts(exchange, cache=answer.cache)])
    pipeline.keep_answer(call.gateway, exchange, answer)


async def _stream(
    call: Call,
    exchange: Exchange,
    request: pipeline.Admitted,
    converter: StreamConverter,
) -> None:
    async def deliver(relay: StreamRelay) -> None:
        sink = HttpSink(call.receive, call.send, [*STREAM_HEADERS, *gateway_facts(exchange)])
        await relay.run(ConvertingSink(sink, converter))

    await pipeline.relay_stream(
        call.gateway, exchange, request, error_event=converter.error_event, deliver=deliver
    )
