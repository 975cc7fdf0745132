"""``POST /v1/messages``: Anthropic's Messages API on the relay (conversions in
:mod:`services.relay.formats.anthropic_messages`). The key comes as ``x-api-key`` (the Anthropic
SDK's header) or as a bearer token; ``anthropic-version`` is accepted and not needed."""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import GatewayError
from services.relay.edge.http.converted import InboundFormat, serve
from services.relay.edge.http.headers import JSON, RawHeaders
from services.relay.edge.http.routes import Call
from services.relay.formats.anthropic_errors import anthropic_error
from services.relay.formats.anthropic_messages import to_anthropic, to_chat
from services.relay.formats.anthropic_stream import MessagesStream
from services.relay.meter.record import Exchange

__all__ = ["messages"]


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
