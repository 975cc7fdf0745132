"""A stream sink that converts: OpenAI's SSE bytes from the relay become another format's events on
the way into the front's own sink, chunk by chunk (nothing is held back)."""

from __future__ import annotations

from typing import Protocol

from services.common.errors import GatewayError
from services.relay.stream.sink import StreamSink

__all__ = ["ConvertingSink", "StreamConverter"]


class StreamConverter(Protocol):
    """One stream's conversion (:class:`~services.relay.formats.anthropic_stream.MessagesStream`,
    :class:`~services.relay.formats.responses_stream.ResponsesStream`)."""

    def convert(self, data: bytes) -> bytes:
        """The events for ``data`` (whole SSE events of OpenAI's chat stream)."""

    def keepalive(self) -> bytes:
        """What the format sends while the upstream is silent."""

    def finish(self) -> bytes:
        """What closes the stream once the upstream ended (an error event when it ended too soon)."""

    def error_event(self, exc: GatewayError) -> bytes:
        """``exc`` in-band, in the format's own shape."""


class ConvertingSink:
    """Wraps the front's sink with ``converter``; a :class:`~services.relay.stream.sink.StreamSink`."""

    __slots__ = ("_converter", "_inner")

    def __init__(self, inner: StreamSink, converter: StreamConverter) -> None:
        self._inner = inner
        self._converter = converter

    async def start(self) -> None:
        await self._inner.start()

    async def write(self, data: bytes) -> None:
        converted = self._converter.convert(data)
        if converted:
            await self._inner.write(converted)

    async def keepalive(self) -> None:
        await self._inner.write(self._converter.keepalive())

    async def closed(self) -> None:
        await self._inner.closed()

    async def finish(self) -> None:
        tail = self._converter.finish()
        if tail:
            await self._inner.write(tail)
        await self._inner.finish()
