"""Server-sent events as they pass through: split on event boundaries, forward the bytes unchanged,
and read usage on the way.

Only events whose bytes mention ``"usage"`` are parsed at all, so ordinary content chunks cost one
substring search. Providers that repeat cumulative usage in every chunk are handled by keeping the
last value (never a sum).
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.relay.usage import from_openai

_DONE = b"data: [DONE]"


class StreamScanner:
    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._strip = strip_usage_chunk
        self._buffer = b""
        self.usage: Usage | None = None
        self.events = 0
        self.done = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Complete events from ``data`` (plus what was buffered), each exactly as received."""
        self._buffer += data
        while True:
            end = self._boundary()
            if end < 0:
                return
            event, self._buffer = self._buffer[:end], self._buffer[end:]
            if self._inspect(event):
                yield event

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the upstream ends."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _boundary(self) -> int:
        for separator in (b"\n\n", b"\r\n\r\n"):
            index = self._buffer.find(separator)
            if index >= 0:
                return index + len(separator)
        return -1

    def _inspect(self, event: bytes) -> bool:
        """Record what matters in ``event``; False when it must not reach the client."""
        self.events += 1
        stripped = event.strip()
        if stripped == _DONE:
            self.done = True
            return True
        if b'"usage"' not in event:
            return True
        for line in stripped.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                chunk = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return True
            if not isinstance(chunk, dict):
                return True
            usage = from_openai(chunk.get("usage"))
            if usage is not None:
                self.usage = usage
                # The usage-only chunk we asked for on the caller's behalf is not theirs to see.
                if self._strip and chunk.get("choices") == []:
                    return False
        return True
