"""Where a stream's bytes go: a front's writer for :class:`~services.relay.stream.streaming.StreamRelay`.

The relay always produces OpenAI's SSE bytes (``data: {chunk}\\n\\n`` events, ``data: [DONE]``, and
the front's own in-band error event); a sink puts them on its wire as they are (the HTTP front) or
converts them (the gRPC front turns each event into a message; another inbound format re-frames
them). The relay calls, in order: :meth:`StreamSink.start` once, :meth:`StreamSink.write` and
:meth:`StreamSink.keepalive` any number of times, then :meth:`StreamSink.finish` unless the client
left. :meth:`StreamSink.closed` runs beside them and returns when the client is gone, which sends the
stream to its drain (see :mod:`services.relay.stream.streaming`).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["KEEPALIVE", "StreamSink"]

# An SSE comment: clients ignore it, idle proxies and load balancers see traffic.
KEEPALIVE = b": keep-alive\n\n"


class StreamSink(Protocol):
    """A front's writer for one stream (see the module docstring)."""

    async def start(self) -> None:
        """Commit the response: from here on, failures can only be reported in-band."""

    async def write(self, data: bytes) -> None:
        """Deliver ``data``: whole SSE events of OpenAI's stream, possibly several at once."""

    async def keepalive(self) -> None:
        """The upstream has been silent for the keep-alive interval: show the client a sign of life."""

    async def closed(self) -> None:
        """Return once the client has gone away (never, while it stays)."""

    async def finish(self) -> None:
        """The stream is over and every byte was written: end the response."""
