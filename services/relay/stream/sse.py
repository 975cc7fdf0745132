"""Server-sent events as they pass through: forward the bytes unchanged and read usage on the way.

:meth:`StreamScanner.feed` returns what may go to the client now: every complete event received so
far, as one slice of the upstream's own bytes (an event split across reads waits for its end). Only
when that slice mentions ``"usage"`` or ``[DONE]`` is it split into events and the matching ones
looked at, so an ordinary content chunk costs a few substring searches. Asked for usage, OpenAI puts
``"usage":null`` in every content chunk: a ``"usage"`` whose value is ``null`` is recognised by looking
at the bytes after it, so those chunks are not decoded either (only a value to read is). Providers
that repeat cumulative usage in every chunk are handled by keeping the last value (never a sum).
"""

from __future__ import annotations

import orjson

from services.common.pb.relaygate.common.v1.types_pb2 import Usage
from services.relay.meter.usage import from_openai

__all__ = ["StreamScanner"]

_DONE = b"data: [DONE]"
_USAGE = b'"usage"'
_JSON_SPACE = b" \t\r\n"
# How far after ``"usage"`` a ``null`` is looked for; one further away is decoded, which is only slower.
_NULL_WINDOW = 24


def _reports_usage(data: bytes) -> bool:
    """Whether a ``"usage"`` in ``data`` may carry a value, i.e. is not followed by ``: null``."""
    at = data.find(_USAGE)
    while at >= 0:
        after = at + len(_USAGE)
        rest = data[after : after + _NULL_WINDOW].lstrip(_JSON_SPACE)
        if not rest.startswith(b":") or not rest[1:].lstrip(_JSON_SPACE).startswith(b"null"):
            return True
        at = data.find(_USAGE, after)
    return False


def _last_boundary(data: bytes) -> int:
    """The end of the last complete event in ``data`` (after its blank line), or 0."""
    end = data.rfind(b"\n\n")
    end = end + 2 if end >= 0 else 0
    crlf = data.rfind(b"\r\n\r\n")
    return max(end, crlf + 4) if crlf >= 0 else end


class StreamScanner:
    """Splits one SSE stream; ``usage`` is the provider's last report, ``done`` whether ``[DONE]`` came."""

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        # The usage-only chunk was asked for on the caller's behalf: it is not theirs to see.
        self._strip = strip_usage_chunk
        self._tail = b""
        self.usage: Usage | None = None
        self.done = False
        # Content-bearing events seen, for an estimate when the provider never reports usage.
        self.events = 0
        # Events decoded to read a usage value: what the scan cost beyond substring searches.
        self.decoded = 0

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward now (possibly empty); an incomplete last event is kept for later."""
        if self._tail:
            data = self._tail + data
        end = _last_boundary(data)
        if end < len(data):
            self._tail = data[end:]
            data = data[:end]
        else:
            self._tail = b""
        if not data:
            return b""
        self.events += data.count(b"\ndata:") + data.startswith(b"data:")
        if _DONE not in data and not _reports_usage(data):
            return data
        return self._inspect(data)

    def flush(self) -> bytes:
        """Whatever incomplete event is left when the upstream ends (forwarded as is)."""
        rest, self._tail = self._tail, b""
        return rest

    def _inspect(self, data: bytes) -> bytes:
        kept: list[bytes] = []
        dropped = False
        for event in _split(data):
            if _DONE in event and event.strip() == _DONE:
                self.done = True
            elif _reports_usage(event) and not self._read_usage(event):
                dropped = True
                continue
            kept.append(event)
        return b"".join(kept) if dropped else data

    def _read_usage(self, event: bytes) -> bool:
        """Record the usage ``event`` carries; False when the event must not reach the client."""
        self.decoded += 1
        for line in event.splitlines():
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
                if self._strip and chunk.get("choices") == []:
                    return False
        return True


def _split(data: bytes) -> list[bytes]:
    """Complete events of ``data`` (which ends on an event boundary), each with its separator."""
    events: list[bytes] = []
    start = 0
    size = len(data)
    while start < size:
        lf = data.find(b"\n\n", start)
        crlf = data.find(b"\r\n\r\n", start)
        if lf < 0 and crlf < 0:
            events.append(data[start:])
            break
        end = crlf + 4 if crlf >= 0 and (lf < 0 or crlf < lf) else lf + 2
        events.append(data[start:end])
        start = end
    return events
