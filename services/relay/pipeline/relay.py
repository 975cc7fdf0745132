"""The request pipeline every front serves through: check the body → authenticate → pick channels →
(cache) → admit on a lease or reserve → call upstream, failing over → settle → publish.

A front reads the request off its own wire (the API key, the raw body, the client's address), opens
the request's record (:class:`~services.relay.meter.record.Exchange`) and hands both here; it gets
back what to write: a complete :class:`Answer`, or an opened :class:`StreamRelay` to deliver. Failures
are raised as the gateway's error tree; the front renders them in its own shape after
:func:`refuse` has settled the request. Nothing here knows which front called.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from services.common import tracing
from services.common.errors import GatewayError, InvalidRequest, ModelNotFound
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.scopes import model_allowed
from services.relay.meter.record import Exchange
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
from services.relay.pipeline.checks import (
    MAX_N,
    MAX_TOKENS,
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    optional_positive_int,
    parse_json,
    require_messages,
    require_model,
    require_text_or_array,
)
from services.relay.pipeline.gateway import Gateway
from services.relay.pipeline.media import inline_images
from services.relay.providers import StreamDecoder, extensions
from services.relay.settings import RelaySettings
from services.relay.stream.sse import StreamScanner
from services.relay.stream.streaming import StreamRelay, stream_payload
from services.relay.upstream.channels import Channel
from services.relay.upstream.proxy import Reply

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "IMAGES",
    "Admitted",
    "Answer",
    "Endpoint",
    "Plan",
    "abandon",
    "admit",
    "allowed_models",
    "answer_json",
    "keep_answer",
    "refuse",
    "relay_stream",
]

# What an upstream's JSON answer is served as when it did not say.
_JSON_TYPE = b"application/json"


# --- the request plans of the endpoints -----------------------------------------------------------


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


def payload_for(
    body: dict[str, Any], raw: bytes, model: str, *, max_output_tokens: int = 0
) -> Callable[[Channel], bytes]:
    """The bytes to send to a channel: the caller's own bytes unless the channel renames the model
    or speaks another format (built by its provider, capped at ``max_output_tokens`` when the caller
    set no cap)."""

    # A body converted from another format with the chat extensions goes without them to the
    # channels that pass bodies through (their APIs refuse unknown fields); the caller's bytes hold them.
    plain = extensions.without_extensions(body) if extensions.MARK in body else None

    def build(channel: Channel) -> bytes:
        upstream_model = channel.upstream_model(model)
        provider = channel.provider
        if provider is not None and provider.converts:
            return provider.request(body, upstream_model, stream=False, max_output_tokens=max_output_tokens)
        if plain is not None:
            return orjson.dumps({**plain, "model": upstream_model})
        if upstream_model == model:
            return raw
        return orjson.dumps({**body, "model": upstream_model})

    return build


def _servable(candidates: list[Channel], endpoint: Endpoint, model: str) -> list[Channel]:
    """The candidates whose channel type can serve ``endpoint``; refuses the request when none can."""
    if all(channel.provider is None for channel in candidates):
        return candidates
    served = [channel for channel in candidates if channel.serves(endpoint.upstream_path)]
    if not served:
        kinds = sorted({channel.provider.kind for channel in candidates if channel.provider is not None})
        raise InvalidRequest(
            f"The model '{model}' is served by {', '.join(kinds)} channels only, which relaygate "
            f"sends chat completions to, not {endpoint.name}.",
            param="model",
        )
    return served


def _held_output(exchange: Exchange, plan: Plan) -> int:
    """The output cap the request was held for: the caller's, else the price book's default."""
    if plan.max_output_tokens:
        return plan.max_output_tokens
    if exchange.price is not None:
        return exchange.price.default_max_output_tokens
    if exchange.reservation is not None:
        return exchange.reservation.price.default_max_output_tokens
    return 0


# --- the path of a request ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed every check: what it asks for and the channels that may serve it."""

    endpoint: Endpoint
    body: dict[str, Any]
    raw: bytes
    plan: Plan
    candidates: list[Channel]


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer for the front to write (after the request was settled)."""

    status: int
    content_type: bytes
    body: bytes
    # The response cache's verdict (b"hit" or b"miss"), None when the cache was not consulted.
    cache: bytes | None = None
    # Where a miss is to be remembered once it was answered (:func:`keep_answer`).
    cache_key: str | None = None


async def admit(
    gateway: Gateway, exchange: Exchange, endpoint: Endpoint, api_key: str, raw: bytes
) -> Admitted:
    """Check ``raw`` against ``endpoint``, authenticate ``api_key`` for its model and find the
    channels serving it; raises the refusal otherwise."""
    settings = gateway.settings
    body = parse_json(raw, max_depth=settings.max_json_depth)
    model = require_model(body)
    exchange.asked_for(model)
    plan = endpoint.plan(body, settings)
    exchange.planned(stream=plan.stream, choices=plan.choices)
    candidates = await channels_for(gateway, exchange, api_key, model)
    servable = _servable(candidates, endpoint, model)
    # A channel that reads only inline images gets URLs fetched here, once, before anything is held.
    inlines = any(c.provider is not None and c.provider.inline_images for c in servable)
    if endpoint is CHAT and gateway.images is not None and inlines:
        inlined = await inline_images(body, gateway.images)
        if inlined is not None:
            body, raw = inlined, orjson.dumps(inlined)
    return Admitted(endpoint, body, raw, plan, servable)


async def channels_for(gateway: Gateway, exchange: Exchange, api_key: str, model: str) -> list[Channel]:
    """The caller authenticated for ``model``, and the channels serving it; refuses when none does."""
    with tracing.span("relay.verify_key"):
        principal = await gateway.authenticator.authenticate(
            api_key, model=model, client_ip=exchange.client_ip
        )
    exchange.authenticated(principal)
    candidates = gateway.channels.table.candidates(model)
    if not candidates:
        raise ModelNotFound(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )
    return candidates


async def allowed_models(gateway: Gateway, api_key: str, *, client_ip: str) -> list[str]:
    """The models ``api_key`` may use among those the channels serve."""
    principal = await gateway.authenticator.authenticate(api_key, model="", client_ip=client_ip)
    patterns = list(principal.allowed_models)
    return [m for m in gateway.channels.table.models if model_allowed(patterns, m)]


async def refuse(gateway: Gateway, exchange: Exchange, exc: GatewayError) -> None:
    """Settle a request that failed before any response byte (its hold is released): the front
    answers ``exc`` next."""
    exchange.fail(exc)
    await gateway.meter.finish(exchange)


def abandon(gateway: Gateway, exchange: Exchange) -> None:
    """The front's task was cancelled before the request finished (see ``Meter.abandon``)."""
    gateway.meter.abandon(exchange)


async def answer_json(
    gateway: Gateway, exchange: Exchange, request: Admitted, *, cache_hint: str | None
) -> Answer:
    """Serve a non-streaming request, from the response cache when the caller opted in
    (``cache_hint``: the caller's own switch, None when it sent none) and it holds the answer."""
    principal = exchange.principal
    assert principal is not None
    plan = request.plan
    cache = gateway.cache
    cache_key = None
    if cache is not None and cache_requested(principal, cache_hint):
        cache_key = cache.key_for(request.endpoint.name, request.body, principal)
    if cache is not None and cache_key is not None:
        hit = await cache.get(cache_key)
        if hit is not None:
            exchange.from_cache()
            if not cache.free_hits:
                await gateway.meter.reserve(
                    exchange, prompt_tokens=plan.prompt_tokens, max_output_tokens=plan.max_output_tokens
                )
            exchange.delivered(hit.usage, status=200)
            await gateway.meter.finish(exchange)
            return Answer(200, hit.content_type, hit.body, cache=b"hit")

    await gateway.meter.reserve(
        exchange,
        prompt_tokens=plan.prompt_tokens,
        max_output_tokens=plan.max_output_tokens,
        images=plan.images,
    )
    reply = await gateway.upstreams.post_json(
        exchange,
        request.candidates,
        request.endpoint.upstream_path,
        payload_for(
            request.body, request.raw, exchange.model, max_output_tokens=_held_output(exchange, plan)
        ),
    )
    exchange.answered(
        channel_id=reply.channel.id,
        upstream_model=reply.channel.upstream_model(exchange.model),
        status=reply.status,
        complete=True,
    )
    provider = reply.channel.provider
    usage: Usage | None
    if provider is not None and provider.converts:
        body, usage = provider.answer(reply.body, exchange.model)
        reply = Reply(reply.channel, reply.status, _JSON_TYPE, body)
    else:
        usage = from_body(reply.body)
    if plan.images:
        images = count_images(reply.body)
        usage = usage or Usage()
        usage.images = plan.images if images is None else images
    elif usage is None:
        # Delivered but unreported: billed as a marked estimate, never for free.
        usage = estimate_answer(reply.body, plan.prompt_tokens)
    exchange.delivered(usage)
    await gateway.meter.finish(exchange)
    return Answer(
        reply.status,
        reply.content_type or _JSON_TYPE,
        reply.body,
        cache=b"miss" if cache_key is not None else None,
        cache_key=cache_key,
    )


def keep_answer(gateway: Gateway, exchange: Exchange, answer: Answer) -> None:
    """Remember a cache miss, in the background (storing never delays the answer)."""
    cache = gateway.cache
    if cache is not None and answer.cache_key is not None and exchange.usage is not None:
        cache.keep(answer.cache_key, answer.content_type, answer.body, exchange.usage)


async def relay_stream(
    gateway: Gateway,
    exchange: Exchange,
    request: Admitted,
    *,
    error_event: Callable[[GatewayError], bytes],
    deliver: Callable[[StreamRelay], Awaitable[None]],
) -> None:
    """Serve a streaming request: hold one of the key's stream slots, reserve, open the upstream
    stream (failing over until one answers) and ``deliver`` it to the caller; ``error_event`` writes
    an error in-band once the stream has started."""
    assert exchange.principal is not None
    with gateway.stream_slots.hold(exchange.principal.key_id):
        plan = request.plan
        await gateway.meter.reserve(
            exchange, prompt_tokens=plan.prompt_tokens, max_output_tokens=plan.max_output_tokens
        )
        build, wants_usage = stream_payload(
            request.body, request.raw, max_output_tokens=_held_output(exchange, plan)
        )
        opened = await gateway.upstreams.open_stream(
            exchange,
            request.candidates,
            request.endpoint.upstream_path,
            build,
            idle_timeout_s=gateway.settings.stream_idle_timeout_s,
        )
        exchange.answered(
            channel_id=opened.channel.id,
            upstream_model=opened.channel.upstream_model(exchange.model),
            status=opened.response.status,
        )
        provider = opened.channel.provider
        scanner: StreamDecoder
        if provider is not None and provider.converts:
            scanner = provider.decoder(exchange.model, include_usage=wants_usage)
        else:
            scanner = StreamScanner(strip_usage_chunk=not wants_usage)
        relay = StreamRelay(
            streams=gateway.streams,
            meter=gateway.meter,
            exchange=exchange,
            opened=opened,
            scanner=scanner,
            prompt_tokens=plan.prompt_tokens,
            error_event=error_event,
        )
        await deliver(relay)
