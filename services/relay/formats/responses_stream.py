"""An OpenAI chat stream as the Responses API's event stream, converted chunk by chunk as it passes.

The sequence (https://platform.openai.com/docs/api-reference/responses-streaming):
``response.created`` and ``response.in_progress`` on the first chunk; for text, an output item
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

import orjson

from services.common.errors import GatewayError, UpstreamError
from services.relay.formats.common import ERROR_MARK, ChatUsage, chat_usage, data_of, event, obj, split_events
from services.relay.formats.responses import (
    ResponseShape,
    function_call_item,
    message_item,
    response_object,
)
from services.relay.stream.sink import KEEPALIVE

__all__ = ["ResponsesStream"]

_DONE = b"[DONE]"


class _Item:
    """One output item being streamed: the message's text, or a function call."""

    __slots__ = ("arguments", "call_id", "item_id", "name", "output_index", "pieces")

    def __init__(self, item_id: str, output_index: int, *, call_id: str = "", name: str = "") -> None:
        self.item_id = item_id
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.pieces: list[str] = []

    @property
    def is_call(self) -> bool:
        return bool(self.call_id or self.name)

    def item(self, status: str) -> dict[str, Any]:
        text = "".join(self.pieces)
        if self.is_call:
            return function_call_item(self.item_id, self.call_id, self.name, text, status=status)
        if status == "in_progress":
            return {**message_item(self.item_id, "", status=status), "content": []}
        return message_item(self.item_id, text, status=status)


class ResponsesStream:
    """The conversion state of one stream."""

    __slots__ = (
        "_calls",
        "_done",
        "_ended",
        "_error",
        "_finish",
        "_open",
        "_sequence",
        "_shape",
        "_started",
        "_usage",
    )

    def __init__(self, shape: ResponseShape) -> None:
        self._shape = shape
        self._sequence = 0
        self._started = False
        self._ended = False
        # The gateway's in-band error, rendered where its marker comes in the stream.
        self._error: GatewayError | None = None
        self._open: _Item | None = None
        # Finished output items, in order, for the final Response.
        self._done: list[dict[str, Any]] = []
        # The chat tool-call index → its item.
        self._calls: dict[int, _Item] = {}
        self._finish: str | None = None
        self._usage: ChatUsage | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    def convert(self, data: bytes) -> bytes:
        """The Responses events for ``data``: complete chat SSE events as the relay forwards them."""
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
                self._complete(out)
            elif not self._ended:
                self._chunk(payload, out)
        return b"".join(out)

    def keepalive(self) -> bytes:
        # A comment: the SDKs skip it, and a Responses stream has no event for it.
        return KEEPALIVE

    def finish(self) -> bytes:
        """What closes a stream that ended without ``[DONE]``."""
        out: list[bytes] = []
        if not self._ended:
            if self._finish is not None:
                self._complete(out)
            else:
                out.append(self._fail(UpstreamError("The upstream stream ended before the response did.")))
        return b"".join(out)

    def error_event(self, exc: GatewayError) -> bytes:
        """A marker for ``exc``: the relay queues it after the chunks still to be written, and it is
        rendered when it comes through :meth:`convert`, in its place in the stream."""
        self._error = exc
        return ERROR_MARK + b"\n\n"

    def _fail(self, exc: GatewayError) -> bytes:
        """``exc`` in-band (the ``error`` event); nothing follows it."""
        self._ended = True
        return self._event("error", {"code": exc.code, "message": exc.message, "param": exc.param})

    def _event(self, kind: str, payload: dict[str, Any]) -> bytes:
        sequence = self._sequence
        self._sequence += 1
        return event(kind.encode(), {"type": kind, **payload, "sequence_number": sequence})

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
            out.append(self._event("error", {"code": error.get("code"), "message": message, "param": None}))
            return
        if not self._started:
            self._start(out)
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
                        self._call(call, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._close(out)
            self._finish = reason

    def _response(self, status: str, *, usage: ChatUsage | None = None) -> dict[str, Any]:
        return response_object(
            self._shape, status=status, output=list(self._done), usage=usage, finish_reason=self._finish
        )

    def _start(self, out: list[bytes]) -> None:
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

    def _text(self, text: str, out: list[bytes]) -> None:
        item = self._open
        if item is None or item.is_call:
            self._close(out)
            suffix = self._shape.response_id.removeprefix("resp_")
            item = _Item(f"msg_{suffix}_{len(self._done)}", len(self._done))
            self._add(item, out)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._event("response.content_part.added", self._where(item, part=part)))
        item.pieces.append(text)
        out.append(self._event("response.output_text.delta", self._where(item, delta=text, logprobs=[])))

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", len(self._calls))
        position = position if isinstance(position, int) else len(self._calls)
        function = obj(call.get("function"))
        item = self._calls.get(position)
        if item is None:
            self._close(out)
            suffix = self._shape.response_id.removeprefix("resp_")
            item = _Item(
                f"fc_{suffix}_{len(self._done)}",
                len(self._done),
                call_id=str(call.get("id") or ""),
                name=str(function.get("name") or ""),
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

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = "".join(item.pieces)
        if item.is_call:
            payload = {"item_id": item.item_id, "output_index": item.output_index, "name": item.name}
            out.append(self._event("response.function_call_arguments.done", {**payload, "arguments": text}))
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
            self._start(out)
        self._close(out)
        self._ended = True
        response = self._response("completed", usage=self._usage or ChatUsage())
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, {"response": response}))
