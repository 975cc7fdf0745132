"""An OpenAI chat stream as Anthropic's Messages event stream, converted chunk by chunk as it passes.

Anthropic's sequence (https://docs.anthropic.com/en/api/messages-streaming): ``message_start``,
``ping``, then per content block ``content_block_start`` / ``content_block_delta`` (``text_delta``,
``input_json_delta``) / ``content_block_stop``, then ``message_delta`` (``stop_reason`` and usage) and
``message_stop``. A chat stream says all of that in a different order: the text and each tool call's
id, name and argument pieces as deltas, the finish reason on the last choice chunk, the usage in a
chunk of its own, then ``[DONE]``. So a block is opened by its first delta and closed when another
kind of delta or the finish reason comes; the message is closed at ``[DONE]``, when the usage is known.

Nothing is held back: each call of :meth:`MessagesStream.convert` returns the events for the chunks it
was given. Keep-alives are ``ping`` events; the gateway's own in-band errors are rendered where they
come in the stream (:meth:`MessagesStream.error_event`).
"""

from __future__ import annotations

from typing import Any

import orjson

from services.common.errors import GatewayError, UpstreamError
from services.relay.formats.anthropic_errors import anthropic_error_event, error_type
from services.relay.formats.anthropic_messages import STOP_REASONS, message_id, usage_of
from services.relay.formats.common import ERROR_MARK, ChatUsage, chat_usage, data_of, event, obj, split_events
from services.relay.stream.sink import KEEPALIVE

__all__ = ["MessagesStream"]

_DONE = b"[DONE]"
_PING = event(b"ping", {"type": "ping"})
_BLOCK_STOP = b"content_block_stop"


class MessagesStream:
    """The conversion state of one stream; ``model`` is the name the caller asked for."""

    __slots__ = (
        "_block",
        "_blocks",
        "_ended",
        "_error",
        "_model",
        "_started",
        "_stop_reason",
        "_tools",
        "_usage",
    )

    def __init__(self, model: str) -> None:
        self._model = model
        self._started = False
        self._ended = False
        # The gateway's in-band error, rendered where its marker comes in the stream.
        self._error: GatewayError | None = None
        # The index of the open content block (-1: none) and how many were opened.
        self._block = -1
        self._blocks = 0
        # The chat tool-call index → its content block's index.
        self._tools: dict[int, int] = {}
        self._stop_reason: str | None = None
        self._usage: ChatUsage | None = None

    @property
    def ended(self) -> bool:
        """Whether the message was closed (``message_stop``) or ended by an error event."""
        return self._ended

    def convert(self, data: bytes) -> bytes:
        """The Anthropic events for ``data``: complete chat SSE events as the relay forwards them."""
        out: list[bytes] = []
        for block in split_events(data):
            if block == ERROR_MARK:
                if self._error is not None and not self._ended:
                    out.append(self._fail(self._error))
                continue
            payload = data_of(block)
            if not payload:
                continue
            if payload == _DONE:
                self._close_message(out)
            elif not self._ended:
                self._chunk(payload, out)
        return b"".join(out)

    def keepalive(self) -> bytes:
        # Anthropic's pings follow message_start; before it, an SSE comment (every client skips it).
        return _PING if self._started else KEEPALIVE

    def finish(self) -> bytes:
        """What closes a stream that ended without ``[DONE]``: the message when its end was seen,
        else an error event (the upstream stopped mid-answer)."""
        out: list[bytes] = []
        if not self._ended:
            if self._stop_reason is not None:
                self._close_message(out)
            else:
                out.append(self._fail(UpstreamError("The upstream stream ended before the message did.")))
        return b"".join(out)

    def error_event(self, exc: GatewayError) -> bytes:
        """A marker for ``exc``: the relay queues it after the chunks still to be written, and it is
        rendered when it comes through :meth:`convert`, in its place in the stream."""
        self._error = exc
        return ERROR_MARK + b"\n\n"

    def _fail(self, exc: GatewayError) -> bytes:
        """``exc`` in-band; nothing follows it."""
        self._ended = True
        return anthropic_error_event(exc)

    def _chunk(self, payload: bytes, out: list[bytes]) -> None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(chunk, dict):
            return
        error = chunk.get("error")
        if isinstance(error, dict):
            self._ended = True
            message = error.get("message") if isinstance(error.get("message"), str) else "Upstream error."
            out.append(
                event(b"error", {"type": "error", "error": {"type": error_type(500), "message": message}})
            )
            return
        if not self._started:
            self._start(chunk, out)
        usage = chat_usage(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text(text, out)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool(call, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._close_block(out)
            self._stop_reason = STOP_REASONS.get(reason, "end_turn")

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The chat stream reports usage only at its end (in message_delta).
            "usage": usage_of(None),
        }
        out.append(event(b"message_start", {"type": "message_start", "message": message}))
        out.append(_PING)

    def _open(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._close_block(out)
        index = self._block = self._blocks
        self._blocks += 1
        out.append(
            event(
                b"content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return index

    def _close_block(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(event(_BLOCK_STOP, {"type": "content_block_stop", "index": self._block}))
            self._block = -1

    def _text(self, text: str, out: list[bytes]) -> None:
        index = self._block
        if index < 0 or index in self._tools.values():
            index = self._open({"type": "text", "text": ""}, out)
        delta = {"type": "text_delta", "text": text}
        out.append(
            event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", len(self._tools))
        position = position if isinstance(position, int) else len(self._tools)
        function = obj(call.get("function"))
        index = self._tools.get(position)
        if index is None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or "",
                "name": function.get("name") or "",
                "input": {},
            }
            index = self._tools[position] = self._open(block, out)
        pieces = function.get("arguments")
        if isinstance(pieces, str) and pieces:
            delta = {"type": "input_json_delta", "partial_json": pieces}
            out.append(
                event(b"content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )

    def _close_message(self, out: list[bytes]) -> None:
        if self._ended:
            return
        if not self._started:
            self._start({}, out)
        self._close_block(out)
        self._ended = True
        delta = {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None}
        out.append(
            event(b"message_delta", {"type": "message_delta", "delta": delta, "usage": usage_of(self._usage)})
        )
        out.append(event(b"message_stop", {"type": "message_stop"}))
