"""``POST /v1/responses``: OpenAI's Responses API on the relay, without server-side state
(conversions in :mod:`services.relay.formats.responses`). Errors keep OpenAI's shape, which the
Responses API shares with chat."""

from __future__ import annotations

from typing import Any

from services.common.errors import GatewayError
from services.relay.edge.http.converted import InboundFormat, serve
from services.relay.edge.http.headers import RawHeaders
from services.relay.edge.http.openai_errors import error_body
from services.relay.edge.http.routes import Call
from services.relay.formats.responses import ResponseShape, to_chat, to_response
from services.relay.formats.responses_stream import ResponsesStream
from services.relay.meter.record import Exchange

__all__ = ["responses"]


class _Conversion:
    __slots__ = ("_shape",)

    def __init__(self, body: dict[str, Any], exchange: Exchange) -> None:
        # The response id is the relay's request id, so a caller's id finds the request log.
        self._shape = ResponseShape.of(body, "resp_" + exchange.request_id.removeprefix("req_"))

    def answer(self, chat_answer: bytes) -> bytes:
        return to_response(chat_answer, self._shape)

    def stream(self) -> ResponsesStream:
        return ResponsesStream(self._shape)


def _error(exc: GatewayError, request_id: str) -> tuple[int, bytes, RawHeaders]:
    return error_body(exc, request_id=request_id)


RESPONSES = InboundFormat(endpoint="responses", to_chat=to_chat, conversion=_Conversion, error=_error)


async def responses(call: Call) -> None:
    await serve(call, RESPONSES)
