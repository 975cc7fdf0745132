"""An OpenAI chat stream as Anthropic's Messages event stream, converted chunk by chunk as it passes.

Anthropic's sequence (https://docs.anthropic.com/en/api/messages-streaming): ``message_start``,
``ping``, then per content block ``content_block_start`` / ``content_block_delta`` (``thinking_delta``
and the ``signature_delta`` that ends a thinking block, ``text_delta``, ``input_json_delta``) /
``content_block_stop`` (a ``redacted_thinking`` block comes whole in its start), then
``message_delta`` (``stop_reason`` and usage) and ``message_stop``
(https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking#streaming-thinking). A chat
stream says all of that in a different order: thinking as ``reasoning_content`` pieces and the
``thinking_blocks`` that carry a block's signature (or a redacted block), the text and each tool
call's id, name and argument pieces as deltas, the finish reason on the last choice chunk, the usage
in a chunk of its own, then ``[DONE]``. So a block is opened by its first delta and closed by its
signature, or when another kind of delta or the finish reason comes (a thinking block from a channel
that signs nothing keeps an empty signature); the message is closed at ``[DONE]``, when the usage is
known.

Nothing is held back: each call of :meth:`MessagesStream.convert` returns the events for the chunks it
was given. Keep-alives are ``ping`` events; the gateway's own in-band errors are rendered where they
come in the stream (:meth:`MessagesStream.error_event`).
"""

from __future__ import annotations

from typing import Any

from services.common.errors import GatewayError
from services.relay.formats.anthropic_errors import anthropic_error_event, error_type
from services.relay.formats.anthropic_messages import STOP_REASONS, message_id, usage_of
from services.relay.formats.chat_stream import ChatStreamConversion
from services.relay.formats.common import event, obj
from services.relay.stream.sink import KEEPALIVE

__all__ = ["MessagesStream"]

_PING = event(b"ping", {"type": "ping"})
_BLOCK_STOP = b"content_block_stop"
_THINKING_START = {"type": "thinking", "thinking": "", "signature": ""}


class MessagesStream(ChatStreamConversion):
    """The conversion state of one stream; ``model`` is the name the caller asked for."""

    __slots__ = (
        "_block",
        "_blocks",
        "_kind",
        "_model",
        "_stop_reason",
        "_tools",
    )

    WHOLE = "message"

    def __init__(self, model: str) -> None:
        super().__init__()
        self._model = model
        # The index of the open content block (-1: none) and how many were opened.
        self._block = -1
        self._blocks = 0
        # The open block's type ("" when none is open).
        self._kind = ""
        # The chat tool-call index → its content block's index.
        self._tools: dict[int, int] = {}
        self._stop_reason: str | None = None

    def keepalive(self) -> bytes:
        # Anthropic's pings follow message_start; before it, an SSE comment (every client skips it).
        return _PING if self._started else KEEPALIVE

    def _fail(self, exc: GatewayError) -> bytes:
        """``exc`` in-band; nothing follows it."""
        self._ended = True
        return anthropic_error_event(exc)

    @property
    def _end_seen(self) -> bool:
        return self._stop_reason is not None

    def _upstream_error(self, error: dict[str, Any], message: str) -> bytes:
        return event(b"error", {"type": "error", "error": {"type": error_type(500), "message": message}})

    def _finished(self, reason: str, out: list[bytes]) -> None:
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
        self._kind = block["type"]
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
            self._kind = ""

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        payload = {"type": "content_block_delta", "index": self._block, "delta": delta}
        out.append(event(b"content_block_delta", payload))

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._kind != "text":
            self._open({"type": "text", "text": ""}, out)
        # The most frequent event: built inline.
        delta = {"type": "text_delta", "text": text}
        out.append(
            event(
                b"content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta}
            )
        )

    def _reasoning(self, text: str, out: list[bytes]) -> None:
        if self._kind != "thinking":
            self._open(_THINKING_START, out)
        self._delta({"type": "thinking_delta", "thinking": text}, out)

    def _thinking_block(self, block: dict[str, Any], out: list[bytes]) -> None:
        kind = block.get("type")
        if kind == "thinking":
            signature = block.get("signature")
            if not isinstance(signature, str) or not signature:
                return
            if self._kind != "thinking":
                self._open(_THINKING_START, out)
            self._delta({"type": "signature_delta", "signature": signature}, out)
            self._close_block(out)
        elif kind == "redacted_thinking":
            data = block.get("data")
            # Anthropic streams a redacted block whole: its start carries the data.
            self._open({"type": "redacted_thinking", "data": data if isinstance(data, str) else ""}, out)
            self._close_block(out)

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

    def _complete(self, out: list[bytes]) -> None:
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
