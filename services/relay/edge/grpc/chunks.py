"""The inference service's stream sink: OpenAI's SSE events as ``ChatCompletionChunk`` messages.

Each ``data:`` event becomes one message, ``[DONE]`` ends the stream (the RPC's own end says it), and
comments (keep-alives) are dropped: gRPC keeps an idle connection with HTTP/2 pings instead. A failure
once chunks are out cannot change the (already sent) headers, so it is kept and ends the call with
its status after the last chunk (:attr:`GrpcSink.failure`): the relay's in-band error writer
(:meth:`GrpcSink.error_event`) records it, and so does an error event sent by the upstream itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson

from services.common.errors import GatewayError, UpstreamError
from services.relay.edge.grpc.convert import read_chunk

__all__ = ["GrpcSink"]

_DONE = b"[DONE]"

Context = grpc.aio.ServicerContext[Any, Any]


class GrpcSink:
    """One StreamChatCompletion call; a :class:`~services.relay.stream.sink.StreamSink`."""

    def __init__(self, context: Context, *, request_id: str) -> None:
        self._context = context
        self._request_id = request_id
        self._tail = b""
        self._gone = asyncio.get_running_loop().create_future()
        self.failure: GatewayError | None = None
        # grpc-stubs declares the callback as a class rather than a callable.
        context.add_done_callback(self._done)  # type: ignore[arg-type]

    def _done(self, _context: Any) -> None:
        if not self._gone.done():
            self._gone.set_result(None)

    def error_event(self, error: GatewayError) -> bytes:
        """The relay's in-band error: kept for the call's status, nothing to write."""
        self.failure = error
        return b""

    async def start(self) -> None:
        await self._context.send_initial_metadata((("x-request-id", self._request_id),))

    async def write(self, data: bytes) -> None:
        data = self._tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._tail = data
            return
        self._tail = data[end + 2 :]
        for event in data[: end + 2].replace(b"\r\n", b"\n").split(b"\n\n"):
            await self._event(event)

    async def _event(self, event: bytes) -> None:
        payload = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not payload or payload == _DONE:
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.failure = self.failure or UpstreamError("The upstream sent an event that is not JSON.")
            return
        if not isinstance(chunk, dict):
            return
        error = chunk.get("error")
        if error is not None and "choices" not in chunk:
            message = error.get("message") if isinstance(error, dict) else None
            self.failure = self.failure or UpstreamError(
                f"The upstream failed mid-stream: {message}" if isinstance(message, str) else None
            )
            return
        await self._context.write(read_chunk(chunk))

    async def keepalive(self) -> None:
        return None

    async def closed(self) -> None:
        await self._gone

    async def finish(self) -> None:
        # An event the upstream left unterminated when it ended (forwarded as is over HTTP).
        tail, self._tail = self._tail, b""
        if tail.strip():
            await self._event(tail)
