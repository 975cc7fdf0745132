"""What converting the relay's chat stream into another format's events always does.

The relay writes OpenAI chat SSE events (and the gateway's in-band error marker) to a format's sink;
:class:`ChatStreamConversion` reads them as they pass: each chunk's text and tool-call deltas, its
thinking (``reasoning_content`` pieces, the ``thinking_blocks`` that sign them), finish reason and
usage, ``[DONE]``, the error marker in its place, and a stream that stops before its
end. A format (:mod:`.anthropic_stream`, :mod:`.responses_stream`) says what each of those becomes.
"""

from __future__ import annotations

import abc
from typing import Any

import orjson

from services.common.errors import GatewayError, UpstreamError
from services.relay.formats.common import ERROR_MARK, ChatUsage, chat_usage, data_of, split_events

__all__ = ["ChatStreamConversion"]

_DONE = b"[DONE]"


class ChatStreamConversion(abc.ABC):
    """The conversion state of one stream (subclasses add theirs)."""

    __slots__ = ("_ended", "_error", "_started", "_usage")

    # What a stream cut before its end did not finish, as its error event says.
    WHOLE = "answer"

    def __init__(self) -> None:
        self._started = False
        self._ended = False
        # The gateway's in-band error, rendered where its marker comes in the stream.
        self._error: GatewayError | None = None
        self._usage: ChatUsage | None = None

    @property
    def ended(self) -> bool:
        """Whether the answer was closed or ended by an error event."""
        return self._ended

    def convert(self, data: bytes) -> bytes:
        """The format's events for ``data``: complete chat SSE events as the relay forwards them."""
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

    def finish(self) -> bytes:
        """What closes a stream that ended without ``[DONE]``: the answer when its end was seen, else
        an error event (the upstream stopped mid-answer)."""
        out: list[bytes] = []
        if not self._ended:
            if self._end_seen:
                self._complete(out)
            else:
                out.append(
                    self._fail(UpstreamError(f"The upstream stream ended before the {self.WHOLE} did."))
                )
        return b"".join(out)

    def error_event(self, exc: GatewayError) -> bytes:
        """A marker for ``exc``: the relay queues it after the chunks still to be written, and it is
        rendered when it comes through :meth:`convert`, in its place in the stream."""
        self._error = exc
        return ERROR_MARK + b"\n\n"

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
            out.append(self._upstream_error(error, str(message)))
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
            # Thinking comes before the text it leads to; a signed block ends with its signature.
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                self._reasoning(reasoning, out)
            blocks = delta.get("thinking_blocks")
            if isinstance(blocks, list):
                for block in blocks:
                    if isinstance(block, dict):
                        self._thinking_block(block, out)
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
            self._finished(reason, out)

    # --- what the format makes of each piece ---------------------------------------------------

    @property
    @abc.abstractmethod
    def _end_seen(self) -> bool:
        """Whether the finish reason came (the answer can be closed without ``[DONE]``)."""

    @abc.abstractmethod
    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        """The first chunk arrived (sets ``_started``)."""

    @abc.abstractmethod
    def _text(self, text: str, out: list[bytes]) -> None:
        """A piece of the answer's text."""

    @abc.abstractmethod
    def _reasoning(self, text: str, out: list[bytes]) -> None:
        """A piece of thinking text (``delta.reasoning_content``)."""

    @abc.abstractmethod
    def _thinking_block(self, block: dict[str, Any], out: list[bytes]) -> None:
        """One of ``delta.thinking_blocks``: the signature that ends a thinking block
        (``{"type": "thinking", "thinking": "", "signature": ...}``), or a whole redacted block."""

    @abc.abstractmethod
    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        """A tool-call delta (its index, and its id, name or a piece of its arguments)."""

    @abc.abstractmethod
    def _finished(self, reason: str, out: list[bytes]) -> None:
        """The choice's finish reason."""

    @abc.abstractmethod
    def _complete(self, out: list[bytes]) -> None:
        """Close the answer (at ``[DONE]``, or at the end of a stream whose end was seen)."""

    @abc.abstractmethod
    def _fail(self, exc: GatewayError) -> bytes:
        """``exc`` in-band; nothing follows it (sets ``_ended``)."""

    @abc.abstractmethod
    def _upstream_error(self, error: dict[str, Any], message: str) -> bytes:
        """An error object the upstream sent inside the stream."""
