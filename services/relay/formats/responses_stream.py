"""An OpenAI chat stream as the Responses API's event stream, converted chunk by chunk as it passes.

The sequence (https://platform.openai.com/docs/api-reference/responses-streaming):
``response.created`` and ``response.in_progress`` on the first chunk; for each thinking block, an
output item ``reasoning`` (``response.output_item.added``, ``response.reasoning_summary_part.added``,
``response.reasoning_summary_text.delta`` per piece, ``.done``, ``response.reasoning_summary_part.done``
and ``output_item.done`` when its signature or the text comes; a redacted block is an item added and
done at once); for text, an output item
``message`` (``response.output_item.added``, ``response.content_part.added``, then
``response.output_text.delta`` per piece, and ``.done`` / ``content_part.done`` / ``output_item.done``
when it ends); for each tool call an output item ``function_call`` (``added``, then
``response.function_call_arguments.delta`` per argument piece, ``.done``, ``output_item.done``);
finally ``response.completed`` (``response.incomplete`` when the output cap cut the answer) with the
whole Response and its usage, once the chat stream's usage chunk and ``[DONE]`` came. Every event
carries its ``sequence_number``.

The ``.done`` events and the final Response repeat the whole text and arguments, so those are kept
as they pass; every event is still written as soon as its chunk arrives.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import GatewayError
from services.relay.formats.chat_stream import ChatStreamConversion
from services.relay.formats.common import ChatUsage, event, obj
from services.relay.formats.responses import (
    ResponseShape,
    function_call_item,
    message_item,
    reasoning_item,
    response_object,
)
from services.relay.stream.sink import KEEPALIVE

__all__ = ["ResponsesStream"]

_MESSAGE = "message"
_CALL = "function_call"
_REASONING = "reasoning"


class _Item:
    """One output item being streamed: the message's text, a function call, or a reasoning item (a
    thinking block's text as its summary)."""

    __slots__ = ("call_id", "item_id", "kind", "name", "output_index", "pieces", "redacted", "signature")

    def __init__(
        self, kind: str, item_id: str, output_index: int, *, call_id: str = "", name: str = ""
    ) -> None:
        self.kind = kind
        self.item_id = item_id
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.pieces: list[str] = []
        self.signature: str | None = None
        self.redacted: str | None = None

    @property
    def is_call(self) -> bool:
        return self.kind == _CALL

    def item(self, status: str) -> dict[str, Any]:
        text = "".join(self.pieces)
        if self.kind == _CALL:
            return function_call_item(self.item_id, self.call_id, self.name, text, status=status)
        if self.kind == _REASONING:
            return reasoning_item(
                self.item_id, text, status=status, signature=self.signature, redacted=self.redacted
            )
        if status == "in_progress":
            return {**message_item(self.item_id, "", status=status), "content": []}
        return message_item(self.item_id, text, status=status)


class ResponsesStream(ChatStreamConversion):
    """The conversion state of one stream."""

    __slots__ = (
        "_calls",
        "_done",
        "_finish",
        "_open",
        "_sequence",
        "_shape",
    )

    WHOLE = "response"

    def __init__(self, shape: ResponseShape) -> None:
        super().__init__()
        self._shape = shape
        self._sequence = 0
        self._open: _Item | None = None
        # Finished output items, in order, for the final Response.
        self._done: list[dict[str, Any]] = []
        # The chat tool-call index → its item.
        self._calls: dict[int, _Item] = {}
        self._finish: str | None = None

    def keepalive(self) -> bytes:
        # A comment: the SDKs skip it, and a Responses stream has no event for it.
        return KEEPALIVE

    def _fail(self, exc: GatewayError) -> bytes:
        """``exc`` in-band (the ``error`` event); nothing follows it."""
        self._ended = True
        return self._event("error", {"code": exc.code, "message": exc.message, "param": exc.param})

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        sequence = self._sequence
        self._sequence += 1
        return event(kind.encode(), {"type": kind, **payload, "sequence_number": sequence})

    def _response(self, status: str, *, usage: ChatUsage | None = None) -> dict[str, Any]:
        return response_object(
            self._shape, status=status, output=list(self._done), usage=usage, finish_reason=self._finish
        )

    @property
    def _end_seen(self) -> bool:
        return self._finish is not None

    def _upstream_error(self, error: dict[str, Any], message: str) -> bytes:
        return self._event("error", {"code": error.get("code"), "message": message, "param": None})

    def _finished(self, reason: str, out: list[bytes]) -> None:
        self._close(out)
        self._finish = reason

    def _start(self, _chunk: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        out.append(self._event("response.created", {"response": self._response("in_progress")}))
        out.append(self._event("response.in_progress", {"response": self._response("in_progress")}))

    def _add(self, item: _Item, out: list[bytes]) -> None:
        self._close(out)
        self._open = item
        out.append(
            self._event(
                "response.output_item.added",
                {"output_index": item.output_index, "item": item.item("in_progress")},
            )
        )

    def _new(self, kind: str, prefix: str, out: list[bytes], **rest: str) -> _Item:
        """A new output item (the open one is closed first: the new one follows it)."""
        self._close(out)
        suffix = self._shape.response_id.removeprefix("resp_")
        return _Item(kind, f"{prefix}_{suffix}_{len(self._done)}", len(self._done), **rest)

    def _reasoning(self, text: str, out: list[bytes]) -> None:
        item = self._open
        if item is None or item.kind != _REASONING:
            item = self._new(_REASONING, "rs", out)
            self._add(item, out)
        if not item.pieces:
            part = {"type": "summary_text", "text": ""}
            out.append(self._event("response.reasoning_summary_part.added", self._summary(item, part=part)))
        item.pieces.append(text)
        out.append(self._event("response.reasoning_summary_text.delta", self._summary(item, delta=text)))

    def _thinking_block(self, block: dict[str, Any], out: list[bytes]) -> None:
        kind = block.get("type")
        if kind == "thinking":
            signature = block.get("signature")
            if not isinstance(signature, str) or not signature:
                return
            item = self._open
            if item is None or item.kind != _REASONING:
                item = self._new(_REASONING, "rs", out)
                self._add(item, out)
            item.signature = signature
            self._close(out)
        elif kind == "redacted_thinking":
            data = block.get("data")
            item = self._new(_REASONING, "rs", out)
            item.redacted = data if isinstance(data, str) else ""
            self._add(item, out)
            self._close(out)

    def _text(self, text: str, out: list[bytes]) -> None:
        item = self._open
        if item is None or item.kind != _MESSAGE:
            item = self._new(_MESSAGE, "msg", out)
            self._add(item, out)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._event("response.content_part.added", self._where(item, part=part)))
        item.pieces.append(text)
        out.append(self._event("response.output_text.delta", self._where(item, delta=text, logprobs=[])))

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", len(self._calls))
        position = position if isinstance(position, int) else len(self._calls)
        function = obj(call.get("function"))
        item = self._calls.get(position)
        if item is None:
            item = self._new(
                _CALL, "fc", out, call_id=str(call.get("id") or ""), name=str(function.get("name") or "")
            )
            self._calls[position] = item
            self._add(item, out)
        pieces = function.get("arguments")
        if isinstance(pieces, str) and pieces:
            item.pieces.append(pieces)
            if item is self._open:
                payload = {"item_id": item.item_id, "output_index": item.output_index, "delta": pieces}
                out.append(self._event("response.function_call_arguments.delta", payload))

    @staticmethod
    def _where(item: _Item, **rest: Any) -> dict[str, Any]:
        return {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0, **rest}

    @staticmethod
    def _summary(item: _Item, **rest: Any) -> dict[str, Any]:
        return {"item_id": item.item_id, "output_index": item.output_index, "summary_index": 0, **rest}

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = "".join(item.pieces)
        if item.kind == _CALL:
            payload = {"item_id": item.item_id, "output_index": item.output_index, "name": item.name}
            out.append(self._event("response.function_call_arguments.done", {**payload, "arguments": text}))
        elif item.kind == _REASONING:
            if item.pieces:
                summary = {"type": "summary_text", "text": text}
                out.append(
                    self._event("response.reasoning_summary_text.done", self._summary(item, text=text))
                )
                out.append(
                    self._event("response.reasoning_summary_part.done", self._summary(item, part=summary))
                )
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out.append(self._event("response.output_text.done", self._where(item, text=text, logprobs=[])))
            out.append(self._event("response.content_part.done", self._where(item, part=part)))
        done = item.item("completed")
        self._done.append(done)
        out.append(
            self._event("response.output_item.done", {"output_index": item.output_index, "item": done})
        )

    def _complete(self, out: list[bytes]) -> None:
        if self._ended:
            return
        if not self._started:
            self._start({}, out)
        self._close(out)
        self._ended = True
        response = self._response("completed", usage=self._usage or ChatUsage())
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, {"response": response}))
