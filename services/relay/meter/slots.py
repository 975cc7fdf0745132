"""Streams per key on this relay process: a cap so one key cannot hold every connection of a relay.

Quota's concurrency limit of a key (when set) counts across relays; this cap needs no round trip and
applies to every key, limit or not. It is per process on purpose: the relay's event loop and sockets
are what it protects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import ConcurrencyLimited

# What a refused caller is told to wait: streams last seconds to minutes, so a short pause and retry.
_RETRY_AFTER_S = 1.0


class StreamSlots:
    """Counts the open streams of each key; owned by the relay's lifespan (one per process)."""

    def __init__(self, max_per_key: int) -> None:
        self._max = max_per_key
        self._open: dict[str, int] = {}

    def open_streams(self, key_id: str) -> int:
        return self._open.get(key_id, 0)

    @contextlib.contextmanager
    def hold(self, key_id: str) -> Iterator[None]:
        """One slot of ``key_id`` for the duration of the block; 429 when all are taken."""
        held = self._open.get(key_id, 0)
        if held >= self._max:
            raise ConcurrencyLimited(
                f"This key already has {held} streams open on this gateway (the limit is {self._max}); "
                "retry when one ends.",
                retry_after=_RETRY_AFTER_S,
            )
        self._open[key_id] = held + 1
        try:
            yield
        finally:
            remaining = self._open[key_id] - 1
            if remaining:
                self._open[key_id] = remaining
            else:
                del self._open[key_id]
