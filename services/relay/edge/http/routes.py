"""The OpenAI-compatible endpoints over HTTP: a thin adapter over the request pipeline
(:mod:`services.relay.pipeline.relay`). It reads the key, the body and the client's address off the
ASGI request, opens the request's record, and writes what the pipeline answers: JSON, an SSE stream,
or a failure in OpenAI's error shape with the gateway's headers.

Handlers are plain ASGI functions dispatched by :mod:`services.relay.edge.http.front`; they answer
every failure themselves, and only reach an upstream or a balance once the request passed every
check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.errors import GatewayError, ModelNotFound
from services.common.telemetry import service_registry
from services.relay.edge.http.headers import JSON, STREAM_HEADERS
from services.relay.edge.http.http_protocol import ARRIVED
from services.relay.edge.http.openai_errors import error_body, sse_error
from services.relay.edge.http.requests import ClientGone, Incoming, read_body
from services.relay.edge.http.sse_sink import HttpSink
from services.relay.meter.facts import gateway_facts
from services.relay.meter.record import Exchange
from services.relay.pipeline import relay as pipeline
from services.relay.pipeline.checks import MAX_API_KEY_CHARS, bounded_credential
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.principals import extract_api_key
from services.relay.stream.streaming import StreamRelay

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Call:
    """One HTTP request as the handlers see it; ``started`` tells whether the response has begun."""

    __slots__ = ("_send", "gateway", "incoming", "receive", "scope", "started")

    def __init__(self, gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway = gateway
        self.scope = scope
        self.receive = receive
        self._send = send
        self.incoming = Incoming.from_scope(scope)
        self.started = False

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.started = True
        await self._send(message)


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, exc: GatewayError, request_id: str = "", allow: str = "") -> None:
    status, body, headers = error_body(exc, request_id=request_id)
    if allow:
        headers.append((b"allow", allow.encode()))
    await respond(send, status, body, headers)


# --- the relay path -------------------------------------------------------------------------------


def begin(call: Call, endpoint: str) -> Exchange:
    incoming = call.incoming
    return Exchange.begin(
        endpoint=endpoint,
        client_ip=incoming.client_ip(
            call.scope, trust_forwarded_for=call.gateway.settings.trust_forwarded_for
        ),
        client_request_id=incoming.client_request_id or "",
        front="http",
        arrived=call.scope.get("state", {}).get(ARRIVED),
    )


async def relay(call: Call, endpoint: pipeline.Endpoint) -> None:
    """Serve one POST to an OpenAI endpoint (see the module docstring)."""
    gateway = call.gateway
    exchange = begin(call, endpoint.name)
    try:
        # A missing key is refused before the body is even read.
        api_key = bounded_credential(
            extract_api_key(call.incoming.authorization, call.incoming.x_api_key), MAX_API_KEY_CHARS
        )
        raw = await read_body(call.receive, call.incoming.content_length, gateway.settings.max_body_bytes)
        request = await pipeline.admit(gateway, exchange, endpoint, api_key, raw)
        if request.plan.stream:
            await _relay_stream(call, exchange, request)
        else:
            await _relay_json(call, exchange, request)
    except ClientGone:
        return
    except asyncio.CancelledError:
        pipeline.abandon(gateway, exchange)
        raise
    except GatewayError as exc:
        await _refuse(call, exchange, exc)
    except Exception:
        log.exception("unhandled error in %s", endpoint.name)
        if not call.started:
            # Released and answered, rather than left to expire (quota bills an expired hold).
            await _refuse(call, exchange, GatewayError())


async def _refuse(call: Call, exchange: Exchange, exc: GatewayError) -> None:
    """Answer a failure that happened before any response byte: release, then the error."""
    await pipeline.refuse(call.gateway, exchange, exc)
    status, body, headers = error_body(exc, request_id=exchange.request_id)
    if exchange.held:
        headers.extend(gateway_facts(exchange)[1:])
    await respond(call.send, status, body, headers)


async def _relay_json(call: Call, exchange: Exchange, request: pipeline.Admitted) -> None:
    answer = await pipeline.answer_json(call.gateway, exchange, request, cache_hint=call.incoming.cache)
    headers = [(b"content-type", answer.content_type), *gateway_facts(exchange, cache=answer.cache)]
    await respond(call.send, answer.status, answer.body, headers)
    pipeline.keep_answer(call.gateway, exchange, answer)


async def _relay_stream(call: Call, exchange: Exchange, request: pipeline.Admitted) -> None:
    async def deliver(relay: StreamRelay) -> None:
        await relay.run(HttpSink(call.receive, call.send, [*STREAM_HEADERS, *gateway_facts(exchange)]))

    await pipeline.relay_stream(call.gateway, exchange, request, error_event=sse_error, deliver=deliver)


# --- the other endpoints --------------------------------------------------------------------------


async def chat_completions(call: Call) -> None:
    await relay(call, pipeline.CHAT)


async def completions(call: Call) -> None:
    await relay(call, pipeline.COMPLETIONS)


async def embeddings(call: Call) -> None:
    await relay(call, pipeline.EMBEDDINGS)


async def image_generations(call: Call) -> None:
    await relay(call, pipeline.IMAGES)


def _model_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "relaygate"}


async def _allowed_models(call: Call) -> list[str]:
    gateway = call.gateway
    incoming = call.incoming
    api_key = bounded_credential(
        extract_api_key(incoming.authorization, incoming.x_api_key), MAX_API_KEY_CHARS
    )
    client_ip = incoming.client_ip(call.scope, trust_forwarded_for=gateway.settings.trust_forwarded_for)
    return await pipeline.allowed_models(gateway, api_key, client_ip=client_ip)


async def models(call: Call) -> None:
    """``GET /v1/models``: the models this key may use."""
    try:
        allowed = await _allowed_models(call)
    except GatewayError as exc:
        await respond_error(call.send, exc)
        return
    created = int(time.time())
    data = [_model_object(m, created) for m in allowed]
    await respond(call.send, 200, orjson.dumps({"object": "list", "data": data}), [JSON])


async def model(call: Call) -> None:
    """``GET /v1/models/{model}``: one model, 404 unless this key may use it."""
    name = call.scope["path"][len("/v1/models/") :]
    try:
        allowed = await _allowed_models(call)
        if name not in allowed:
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.")
    except GatewayError as exc:
        await respond_error(call.send, exc)
        return
    await respond(call.send, 200, orjson.dumps(_model_object(name, int(time.time()))), [JSON])


async def healthz(call: Call) -> None:
    await respond(call.send, 200, b'{"status":"ok"}', [JSON])


async def readyz(call: Call) -> None:
    table = call.gateway.channels.table
    ready = table.loaded
    body = {
        "status": "ready" if ready else "starting",
        "channels": len(table.channels),
        "revision": table.revision,
    }
    await respond(call.send, 200 if ready else 503, orjson.dumps(body), [JSON])


async def metrics(call: Call) -> None:
    call.gateway.upstreams.pools.export_metrics()
    await respond(
        call.send,
        200,
        generate_latest(service_registry("relay")),
        [(b"content-type", CONTENT_TYPE_LATEST.encode())],
    )
