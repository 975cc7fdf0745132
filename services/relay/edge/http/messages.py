"""``POST /v1/messages``: Anthropic's Messages API on the relay (conversions in
:mod:`services.relay.formats.anthropic_messages`). The key comes as ``x-api-key`` (the Anthropic
SDK's header) or as a bearer token; ``anthropic-version`` is accepted and not needed.

``POST /v1/messages/count_tokens`` (which Claude Code and the SDK call) is answered by the provider:
the body, converted as for ``/v1/messages`` and then as an Anthropic channel of the model would get
it, goes to that channel's ``/messages/count_tokens`` (failing over among the model's Anthropic
channels), and its count is the answer. A model with no Anthropic channel is refused (400): the
gateway has no tokenizer, and its byte-based upper bound is not a count. Authenticated like
``/v1/messages``; nothing is held, charged or logged as usage."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from services.common.errors import GatewayError, InvalidRequest, UpstreamError
from services.relay.edge.http.converted import InboundFormat, read_request, serve
from services.relay.edge.http.headers import JSON, RawHeaders
from services.relay.edge.http.requests import ClientGone
from services.relay.edge.http.routes import Call, begin, respond
from services.relay.formats.anthropic_errors import anthropic_error
from services.relay.formats.anthropic_messages import COUNT_FIELDS, COUNT_TOKENS_PATH, to_anthropic, to_chat
from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.formats.common import read_answer
from services.relay.meter.record import Exchange
from services.relay.pipeline import relay as pipeline
from services.relay.upstream.channels import Channel

__all__ = ["count_tokens", "messages"]

log = logging.getLogger(__name__)


class _Conversion:
    __slots__ = ("_model",)

    def __init__(self, body: dict[str, Any], _exchange: Exchange) -> None:
        # The caller's model name is answered back, whatever the channel calls it.
        self._model = str(body.get("model", ""))

    def answer(self, chat_answer: bytes) -> bytes:
        return to_anthropic(chat_answer, self._model)

    def stream(self) -> MessagesStream:
        return MessagesStream(self._model)


def _error(exc: GatewayError, request_id: str) -> tuple[int, bytes, RawHeaders]:
    status, body = anthropic_error(exc)
    headers: RawHeaders = [JSON]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    if exc.retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, round(exc.retry_after))))
    return status, orjson.dumps(body), headers


MESSAGES = InboundFormat(endpoint="messages", to_chat=to_chat, conversion=_Conversion, error=_error)


async def messages(call: Call) -> None:
    await serve(call, MESSAGES)


async def count_tokens(call: Call) -> None:
    """``POST /v1/messages/count_tokens`` (see the module docstring)."""
    gateway = call.gateway
    exchange = begin(call, "messages.count_tokens")
    try:
        api_key, body = await read_request(call)
        # Counting takes no output cap; the conversion checks everything else as for a message.
        chat = to_chat({**body, "max_tokens": 1, "stream": False}, gateway.settings)
        model = str(chat["model"])
        exchange.asked_for(model)
        candidates = await pipeline.channels_for(gateway, exchange, api_key, model)
        counting = [c for c in candidates if c.provider is not None and c.provider.kind == "anthropic"]
        if not counting:
            raise InvalidRequest(
                f"Token counting needs an Anthropic channel, and no channel of the model '{model}' is one: "
                "this gateway has no tokenizer of its own.",
                param="model",
            )

        def payload_for(channel: Channel) -> bytes:
            provider = channel.provider
            assert provider is not None
            request = orjson.loads(
                provider.request(chat, channel.upstream_model(model), stream=False, max_output_tokens=1)
            )
            return orjson.dumps({key: value for key, value in request.items() if key in COUNT_FIELDS})

        reply = await gateway.upstreams.post_json(exchange, counting, COUNT_TOKENS_PATH, payload_for)
        counted = read_answer(reply.body).get("input_tokens")
        if isinstance(counted, bool) or not isinstance(counted, int):
            raise UpstreamError("The Anthropic channel's token count has no input_tokens.")
        await respond(call.send, 200, orjson.dumps({"input_tokens": counted}), [JSON])
    except ClientGone:
        return
    except GatewayError as exc:
        status, error, headers = _error(exc, exchange.request_id)
        await respond(call.send, status, error, headers)
    except Exception:
        log.exception("unhandled error in messages.count_tokens")
        if not call.started:
            status, error, headers = _error(GatewayError(), exchange.request_id)
            await respond(call.send, status, error, headers)
