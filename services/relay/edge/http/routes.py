"""The OpenAI-compatible endpoints. :func:`relay` reads as the request's path through the gateway:
check the input → authenticate → pick channels → (cache) → admit on a lease or reserve → call upstream
→ settle → publish.

Handlers are plain ASGI functions dispatched by :mod:`services.relay.edge.http.front`; they answer
every failure themselves, in OpenAI's error shape, and only reach an upstream or a balance once the
request passed every check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.errors import GatewayError, InvalidRequest, ModelNotFound
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.scopes import model_allowed
from services.common.telemetry import request_id_var
from services.relay.edge.http.headers import JSON, STREAM_HEADERS, gateway_headers
from services.relay.edge.http.openai_errors import error_body, sse_error
from services.relay.edge.http.requests import (
    MAX_API_KEY_CHARS,
    MAX_N,
    MAX_TOKENS,
    ClientGone,
    Incoming,
    bounded_credential,
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    optional_positive_int,
    parse_json,
    read_body,
    require_messages,
    require_model,
    require_text_or_array,
)
from services.relay.meter.accounting import Exchange
from services.relay.meter.usage import (
    count_images,
    estimate_answer,
    estimate_chat_prompt,
    estimate_text_prompt,
    from_body,
    requested_choices,
    requested_max_output,
)
from services.relay.pipeline.cache import cache_requested
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.principals import extract_api_key
from services.relay.settings import RelaySettings
from services.relay.stream.sse import StreamScanner
from services.relay.stream.streaming import StreamRelay, stream_payload
from services.relay.upstream.channels import Channel

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


# --- the request plans of the POST endpoints ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What an endpoint's request asks for: the reservation's estimate and whether it streams."""

    prompt_tokens: int
    max_output_tokens: int
    images: int = 0
    stream: bool = False
    # Completions asked for (n, or best_of when larger): the output cap is held once per choice.
    choices: int = 1


def _common(body: dict[str, Any], *, streams: bool) -> bool:
    optional_positive_int(body, "max_tokens", MAX_TOKENS)
    optional_positive_int(body, "max_completion_tokens", MAX_TOKENS)
    optional_positive_int(body, "n", MAX_N)
    optional_number(body, "temperature")
    optional_number(body, "top_p")
    optional_object(body, "stream_options")
    stream = optional_bool(body, "stream")
    if stream and not streams:
        raise InvalidRequest("This endpoint does not stream.", param="stream")
    return stream


def plan_chat(body: dict[str, Any], limits: RelaySettings) -> Plan:
    stream = _common(body, streams=True)
    messages = require_messages(body, limits.max_messages)
    optional_array(body, "tools", limits.max_tools)
    optional_array(body, "functions", limits.max_tools)
    return Plan(
        estimate_chat_prompt(messages, body),
        requested_max_output(body),
        stream=stream,
        choices=requested_choices(body),
    )


def plan_completion(body: dict[str, Any], limits: RelaySettings) -> Plan:
    stream = _common(body, streams=True)
    prompt = require_text_or_array(body, "prompt", limits.max_input_items)
    # The legacy endpoint's own default is 16 tokens.
    return Plan(
        estimate_text_prompt(prompt),
        requested_max_output(body) or 16,
        stream=stream,
        choices=requested_choices(body),
    )


def plan_embedding(body: dict[str, Any], limits: RelaySettings) -> Plan:
    _common(body, streams=False)
    return Plan(estimate_text_prompt(require_text_or_array(body, "input", limits.max_input_items)), 0)


def plan_image(body: dict[str, Any], _limits: RelaySettings) -> Plan:
    _common(body, streams=False)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt")
    return Plan(estimate_text_prompt(prompt), 0, images=body.get("n") or 1)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    # The path under the channel's base URL.
    upstream_path: bytes
    # Checks the body against the relay's limits and estimates what the reservation must cover.
    plan: Callable[[dict[str, Any], RelaySettings], Plan]


CHAT = Endpoint("chat.completions", b"/chat/completions", plan_chat)
COMPLETIONS = Endpoint("completions", b"/completions", plan_completion)
EMBEDDINGS = Endpoint("embeddings", b"/embeddings", plan_embedding)
IMAGES = Endpoint("images.generations", b"/images/generations", plan_image)


# --- the relay path -------------------------------------------------------------------------------


def begin(call: Call, endpoint: str) -> Exchange:
    request_id = new_id("req")
    request_id_var.set(request_id)
    incoming = call.incoming
    return Exchange(
        request_id=request_id,
        endpoint=endpoint,
        client_ip=incoming.client_ip(
            call.scope, trust_forwarded_for=call.gateway.settings.trust_forwarded_for
        ),
        client_request_id=(incoming.client_request_id or "")[:200],
    )


def payload_for(body: dict[str, Any], raw: bytes, model: str) -> Callable[[Channel], bytes]:
    """The bytes to send to a channel: the caller's own bytes unless the channel renames the model."""

    def build(channel: Channel) -> bytes:
        upstream_model = channel.upstream_model(model)
        if upstream_model == model:
            return raw
        return orjson.dumps({**body, "model": upstream_model})

    return build


async def relay(call: Call, endpoint: Endpoint) -> None:
    """Serve one POST to an OpenAI endpoint (see the module docstring)."""
    gateway = call.gateway
    exchange = begin(call, endpoint.name)
    try:
        # A missing key is refused before the body is even read.
        api_key = bounded_credential(
            extract_api_key(call.incoming.authorization, call.incoming.x_api_key), MAX_API_KEY_CHARS
        )
        settings = gateway.settings
        raw = await read_body(call.receive, call.incoming.content_length, settings.max_body_bytes)
        body = parse_json(raw, max_depth=settings.max_json_depth)
        exchange.model = require_model(body)
        plan = endpoint.plan(body, settings)
        exchange.stream = plan.stream
        exchange.choices = plan.choices
        exchange.principal = await gateway.authenticator.authenticate(
            api_key, model=exchange.model, client_ip=exchange.client_ip
        )
        candidates = gateway.channels.table.candidates(exchange.model)
        if not candidates:
            raise ModelNotFound(
                f"The model '{exchange.model}' does not exist or you do not have access to it.", param="model"
            )
        if plan.stream:
            await _relay_stream(call, exchange, endpoint, body, raw, plan, candidates)
        else:
            await _relay_json(call, exchange, endpoint, body, raw, plan, candidates)
    except ClientGone:
        return
    except asyncio.CancelledError:
        gateway.meter.abandon(exchange)
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
    exchange.fail(exc)
    await call.gateway.meter.finish(exchange)
    status, body, headers = error_body(exc, request_id=exchange.request_id)
    if exchange.held:
        headers.extend(gateway_headers(exchange)[1:])
    await respond(call.send, status, body, headers)


async def _relay_json(
    call: Call,
    exchange: Exchange,
    endpoint: Endpoint,
    body: dict[str, Any],
    raw: bytes,
    plan: Plan,
    candidates: list[Channel],
) -> None:
    gateway = call.gateway
    principal = exchange.principal
    assert principal is not None
    cache = gateway.cache
    cache_key = None
    if cache is not None and cache_requested(principal, call.incoming.cache):
        cache_key = cache.key_for(endpoint.name, body, principal)
    if cache is not None and cache_key is not None:
        hit = await cache.get(cache_key)
        if hit is not None:
            exchange.cached = True
            if not cache.free_hits:
                await gateway.meter.reserve(
                    exchange, prompt_tokens=plan.prompt_tokens, max_output_tokens=plan.max_output_tokens
                )
            exchange.usage = hit.usage
            exchange.status_code = 200
            exchange.end_reason = "done"
            await gateway.meter.finish(exchange)
            headers = [(b"content-type", hit.content_type), *gateway_headers(exchange, cache=b"hit")]
            await respond(call.send, 200, hit.body, headers)
            return

    await gateway.meter.reserve(
        exchange,
        prompt_tokens=plan.prompt_tokens,
        max_output_tokens=plan.max_output_tokens,
        images=plan.images,
    )
    reply = await gateway.upstreams.post_json(
        exchange, candidates, endpoint.upstream_path, payload_for(body, raw, exchange.model)
    )
    exchange.channel_id = reply.channel.id
    exchange.upstream_model = reply.channel.upstream_model(exchange.model)
    exchange.status_code = reply.status
    exchange.end_reason = "done"
    exchange.usage = from_body(reply.body)
    if plan.images:
        images = count_images(reply.body)
        exchange.usage = exchange.usage or Usage()
        exchange.usage.images = plan.images if images is None else images
    elif exchange.usage is None:
        # Delivered but unreported: billed as a marked estimate, never for free.
        exchange.usage = estimate_answer(reply.body, plan.prompt_tokens)
    await gateway.meter.finish(exchange)
    headers = [
        (b"content-type", reply.content_type or JSON[1]),
        *gateway_headers(exchange, cache=b"miss" if cache_key is not None else None),
    ]
    await respond(call.send, reply.status, reply.body, headers)
    if cache is not None and cache_key is not None and exchange.usage is not None:
        await cache.put(cache_key, reply.content_type or JSON[1], reply.body, exchange.usage)


async def _relay_stream(
    call: Call,
    exchange: Exchange,
    endpoint: Endpoint,
    body: dict[str, Any],
    raw: bytes,
    plan: Plan,
    candidates: list[Channel],
) -> None:
    gateway = call.gateway
    assert exchange.principal is not None
    with gateway.stream_slots.hold(exchange.principal.key_id):
        await _open_and_relay_stream(call, exchange, endpoint, body, raw, plan, candidates)


async def _open_and_relay_stream(
    call: Call,
    exchange: Exchange,
    endpoint: Endpoint,
    body: dict[str, Any],
    raw: bytes,
    plan: Plan,
    candidates: list[Channel],
) -> None:
    gateway = call.gateway
    await gateway.meter.reserve(
        exchange, prompt_tokens=plan.prompt_tokens, max_output_tokens=plan.max_output_tokens
    )
    build, wants_usage = stream_payload(body, raw)
    opened = await gateway.upstreams.open_stream(
        exchange,
        candidates,
        endpoint.upstream_path,
        build,
        idle_timeout_s=gateway.settings.stream_idle_timeout_s,
    )
    exchange.channel_id = opened.channel.id
    exchange.upstream_model = opened.channel.upstream_model(exchange.model)
    exchange.status_code = opened.response.status
    relay = StreamRelay(
        streams=gateway.streams,
        meter=gateway.meter,
        exchange=exchange,
        opened=opened,
        scanner=StreamScanner(strip_usage_chunk=not wants_usage),
        prompt_tokens=plan.prompt_tokens,
        error_event=sse_error,
    )
    await relay.run(call.receive, call.send, [*STREAM_HEADERS, *gateway_headers(exchange)])


# --- the other endpoints --------------------------------------------------------------------------


async def chat_completions(call: Call) -> None:
    await relay(call, CHAT)


async def completions(call: Call) -> None:
    await relay(call, COMPLETIONS)


async def embeddings(call: Call) -> None:
    await relay(call, EMBEDDINGS)


async def image_generations(call: Call) -> None:
    await relay(call, IMAGES)


def _model_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "relaygate"}


async def _allowed_models(call: Call) -> tuple[list[str], str]:
    gateway = call.gateway
    incoming = call.incoming
    api_key = bounded_credential(
        extract_api_key(incoming.authorization, incoming.x_api_key), MAX_API_KEY_CHARS
    )
    client_ip = incoming.client_ip(call.scope, trust_forwarded_for=gateway.settings.trust_forwarded_for)
    principal = await gateway.authenticator.authenticate(api_key, model="", client_ip=client_ip)
    patterns = list(principal.allowed_models)
    return [m for m in gateway.channels.table.models if model_allowed(patterns, m)], principal.key_id


async def models(call: Call) -> None:
    """``GET /v1/models``: the models this key may use."""
    try:
        allowed, _ = await _allowed_models(call)
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
        allowed, _ = await _allowed_models(call)
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
    ready = table.revision > 0
    body = {
        "status": "ready" if ready else "starting",
        "channels": len(table.channels),
        "revision": table.revision,
    }
    await respond(call.send, 200 if ready else 503, orjson.dumps(body), [JSON])


async def metrics(call: Call) -> None:
    call.gateway.upstreams.pools.export_metrics()
    await respond(call.send, 200, generate_latest(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
