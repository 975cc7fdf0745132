"""Usage events of requests refused before their key was known, bounded under a flood.

Every request the relay answers is logged, including those refused before there is a principal (no
key, a bad key, auth unreachable), so the audit trail shows them all. Random keys must not turn into
a log storm, though: per relay process, the first ``per_second`` refusals of each wall-clock second
are published one by one, and the rest of that second become one summary event whose
``aggregated`` says how many requests it stands for (status, reason and endpoint of the last one).
The hot path is a comparison and a counter; the summary goes out when the next second's first
refusal arrives, from a timer one second later, or on close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.common.ids import new_id
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from services.relay.meter.record import refusals_summary

__all__ = ["RefusalLog"]

Publish = Callable[[UsageEvent], None]


class RefusalLog:
    def __init__(self, publish: Publish, *, per_second: int = 20, relay_id: str = "") -> None:
        self._publish = publish
        self._per_second = per_second
        # Names this process in summary event ids, which must be unique across relays.
        self._relay_id = relay_id or new_id("relay")
        self._second = 0
        self._sent = 0
        self._held = 0
        self._last: UsageEvent | None = None
        self._timer: asyncio.TimerHandle | None = None

    def record(self, event: UsageEvent) -> None:
        second = event.occurred_at_ms // 1000
        if second != self._second:
            self.flush()
            self._second, self._sent = second, 0
        if self._sent < self._per_second:
            self._sent += 1
            self._publish(event)
            return
        self._held += 1
        self._last = event
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        """Publish the summary of the refusals held back, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        last, held = self._last, self._held
        if last is None or not held:
            return
        self._last, self._held = None, 0
        summary = refusals_summary(
            last, event_id=f"refusals-{self._relay_id}-{self._second}", second=self._second, count=held
        )
        self._publish(summary)
