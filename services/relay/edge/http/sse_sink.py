"""The HTTP front's stream sink: OpenAI's SSE bytes straight onto the ASGI response.

Status 200 and the headers go out when the stream starts; keep-alives are SSE comments; the client is
gone when the server reports ``http.disconnect`` (the only message left once the body was read).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from services.relay.stream.sink import KEEPALIVE

__all__ = ["HttpSink"]

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HttpSink:
    """One SSE response (see the module docstring); a :class:`~services.relay.stream.sink.StreamSink`."""

    __slots__ = ("_headers", "_receive", "_send")

    def __init__(self, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        self._receive = receive
        self._send = send
        self._headers = headers

    async def start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def keepalive(self) -> None:
        await self.write(KEEPALIVE)

    async def closed(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def finish(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
