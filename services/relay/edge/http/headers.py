"""Response headers of the HTTP front: content types, and the stream headers proxies must see.

The gateway's own facts about a request (``x-request-id``, ``x-ratelimit-*``, overhead, balance, cache)
are built in :mod:`services.relay.meter.facts`, shared with the gRPC front's trailing metadata.
"""

from __future__ import annotations

RawHeaders = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
EVENT_STREAM = (b"content-type", b"text/event-stream")
# Proxies (nginx) must not buffer a stream, nor caches keep it.
STREAM_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    EVENT_STREAM,
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)
