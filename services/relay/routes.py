"""The OpenAI-compatible surface. Each handler reads as the request's path through the gateway:
check the input → authenticate → pick channels → reserve → call upstream → settle → publish."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from services.common.errors import GatewayError, InvalidRequest, ModelNotFound
from services.common.ids import new_id
from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.common.scopes import model_allowed
from services.common.telemetry import request_id_var
from services.relay.accounting import Exchange
from services.relay.channels import Channel
from services.relay.deps import Gateway, GatewayDep
from services.relay.principals import extract_api_key
from services.relay.requests import (
    optional_bool,
    optional_positive_int,
    read_json,
    require_messages,
    require_model,
)
from services.relay.streaming import relay_stream
from services.relay.usage import estimate_chat_prompt, estimate_text_prompt, from_openai, requested_max_output

router = APIRouter()


def client_ip(request: Request, trust_forwarded_for: bool) -> str:
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",", 1)[0].strip()
    return request.client.host if request.client else ""


def begin(request: Request, gateway: Gateway, endpoint: str) -> Exchange:
    request_id = new_id("req")
    request.state.request_id = request_id
    request_id_var.set(request_id)
    return Exchange(
        request_id=request_id,
        endpoint=endpoint,
        client_ip=client_ip(request, gateway.settings.trust_forwarded_for),
    )


def payload_for(body: dict[str, Any], raw: bytes, model: str) -> Callable[[Channel], bytes]:
    """The bytes to send to a channel: the caller's own bytes unless the channel renames the model."""

    def build(channel: Channel) -> bytes:
        upstream_model = channel.upstream_model(model)
        if upstream_model == model:
            return raw
        return orjson.dumps({**body, "model": upstream_model})

    return build


async def relay_json(
    request: Request,
    gateway: Gateway,
    exchange: Exchange,
    body: dict[str, Any],
    raw: bytes,
    *,
    path: str,
    prompt_tokens: int,
    max_output_tokens: int,
    images: int = 0,
) -> Response:
    """The non-streaming path: one upstream answer, billed on its reported usage."""
    try:
        candidates = await authorize(request, gateway, exchange)
        reservation = await gateway.meter.reserve(
            exchange, prompt_tokens=prompt_tokens, max_output_tokens=max_output_tokens, images=images
        )
        reply = await gateway.upstreams.post_json(
            candidates, path, payload_for(body, raw, exchange.model), request_id=exchange.request_id
        )
    except GatewayError as exc:
        exchange.error = exc
        exchange.status_code = exc.status
        exchange.end_reason = "refused" if exchange.reservation is None else "upstream_error"
        await gateway.meter.finish(exchange)
        raise
    exchange.channel_id = reply.channel.id
    exchange.upstream_model = reply.channel.upstream_model(exchange.model)
    exchange.status_code = reply.status
    exchange.upstream_s = reply.elapsed_s
    exchange.ttfb_s = reply.ttfb_s
    exchange.attempts = reply.attempts
    exchange.end_reason = "done"
    if 200 <= reply.status < 300:
        exchange.usage = usage_of(reply.body, images=images)
    await gateway.meter.finish(exchange)
    headers = {
        "x-request-id": exchange.request_id,
        "x-relaygate-overhead-ms": f"{(exchange.elapsed_s() - exchange.upstream_s) * 1000:.2f}",
        "x-relaygate-available-micros": str(reservation.available_micros),
    }
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=headers)


def usage_of(body: bytes, *, images: int) -> Usage | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    usage = from_openai(parsed.get("usage")) if isinstance(parsed, dict) else None
    if images and usage is not None:
        data = parsed.get("data") if isinstance(parsed, dict) else None
        usage.images = len(data) if isinstance(data, list) else images
    elif images:
        data = parsed.get("data") if isinstance(parsed, dict) else None
        usage = Usage(images=len(data) if isinstance(data, list) else images)
    return usage


async def authorize(request: Request, gateway: Gateway, exchange: Exchange) -> list[Channel]:
    api_key = extract_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    exchange.principal = await gateway.authenticator.authenticate(
        api_key, model=exchange.model, client_ip=exchange.client_ip
    )
    candidates = gateway.channels.table.candidates(exchange.model)
    if not candidates:
        raise ModelNotFound(
            f"The model '{exchange.model}' does not exist or you do not have access to it.", param="model"
        )
    return candidates


async def _parse(request: Request, gateway: Gateway, exchange: Exchange) -> tuple[dict[str, Any], bytes]:
    # A missing key is refused before the body is even read.
    extract_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    body, raw = await read_json(request, gateway.settings.max_body_bytes)
    exchange.model = require_model(body)
    exchange.stream = optional_bool(body, "stream")
    optional_positive_int(body, "max_tokens")
    optional_positive_int(body, "max_completion_tokens")
    return body, raw


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
    exchange = begin(request, gateway, "chat.completions")
    body, raw = await _parse(request, gateway, exchange)
    prompt = estimate_chat_prompt(require_messages(body))
    max_output = requested_max_output(body)
    if exchange.stream:
        candidates = await authorize(request, gateway, exchange)
        return await relay_stream(
            gateway,
            exchange,
            body,
            "/chat/completions",
            candidates,
            prompt_tokens=prompt,
            max_output_tokens=max_output,
        )
    return await relay_json(
        request,
        gateway,
        exchange,
        body,
        raw,
        path="/chat/completions",
        prompt_tokens=prompt,
        max_output_tokens=max_output,
    )


@router.post("/v1/completions")
async def completions(request: Request, gateway: GatewayDep) -> Response:
    exchange = begin(request, gateway, "completions")
    body, raw = await _parse(request, gateway, exchange)
    if "prompt" not in body:
        raise InvalidRequest("You must provide a 'prompt'.", param="prompt")
    prompt = estimate_text_prompt(body.get("prompt"))
    max_output = requested_max_output(body) or 16
    if exchange.stream:
        candidates = await authorize(request, gateway, exchange)
        return await relay_stream(
            gateway,
            exchange,
            body,
            "/completions",
            candidates,
            prompt_tokens=prompt,
            max_output_tokens=max_output,
        )
    return await relay_json(
        request,
        gateway,
        exchange,
        body,
        raw,
        path="/completions",
        prompt_tokens=prompt,
        max_output_tokens=max_output,
    )


@router.post("/v1/embeddings")
async def embeddings(request: Request, gateway: GatewayDep) -> Response:
    exchange = begin(request, gateway, "embeddings")
    body, raw = await _parse(request, gateway, exchange)
    if "input" not in body:
        raise InvalidRequest("You must provide an 'input'.", param="input")
    prompt = estimate_text_prompt(body.get("input"))
    return await relay_json(
        request, gateway, exchange, body, raw, path="/embeddings", prompt_tokens=prompt, max_output_tokens=0
    )


@router.post("/v1/images/generations")
async def image_generations(request: Request, gateway: GatewayDep) -> Response:
    exchange = begin(request, gateway, "images.generations")
    body, raw = await _parse(request, gateway, exchange)
    optional_positive_int(body, "n")
    n = body.get("n") or 1
    prompt = estimate_text_prompt(body.get("prompt"))
    return await relay_json(
        request,
        gateway,
        exchange,
        body,
        raw,
        path="/images/generations",
        prompt_tokens=prompt,
        max_output_tokens=0,
        images=int(n),
    )


@router.get("/v1/models")
async def models(request: Request, gateway: GatewayDep) -> Response:
    exchange = begin(request, gateway, "models")
    api_key = extract_api_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
    principal = await gateway.authenticator.authenticate(api_key, model="", client_ip=exchange.client_ip)
    allowed = [m for m in gateway.channels.table.models if model_allowed(list(principal.allowed_models), m)]
    created = int(time.time())
    data = [{"id": m, "object": "model", "created": created, "owned_by": "relaygate"} for m in allowed]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(gateway: GatewayDep) -> Response:
    table = gateway.channels.table
    ready = table.revision > 0
    body = {
        "status": "ready" if ready else "starting",
        "channels": len(table.channels),
        "revision": table.revision,
    }
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
