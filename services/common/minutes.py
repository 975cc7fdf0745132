"""Counters and latency sketches per wall-clock minute over the last hour: the performance view's series.

Every process cuts time at the same minute boundaries (the wall clock's), so the view adds the
relays' series minute by minute, counters summed and sketches merged bucket by bucket, as it merges
their windows (coarser: see :data:`COARSE`). Recording touches only the current minute. A minute that
closed never changes, so its wire form is built once when it closes and posting the series every second
converts only the current one. A clock that steps back keeps recording into the current minute rather
than reopen an old one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from services.common.rolling import Slot
from services.common.sketch import Sketch

MINUTE_S = 60
# Minutes kept, the current one included.
KEEP = 60
# A minute's sketch is posted with every COARSE neighbouring buckets as one (their middle one): a chart
# point needs no 1 % precision, and an hour of full sketches was ~130 KB a relay every second. The
# indices stay the sketch's own, so coarse sketches still add across relays; within about 4 %.
COARSE = 4


class Minutes:
    """The last ``keep`` minutes of counters and sketches (one event loop; no locking)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, keep: int = KEEP) -> None:
        self._clock = clock
        self._keep = keep
        self._current = Slot(self._number())
        self._closed: deque[dict[str, Any]] = deque()

    def _number(self) -> int:
        return int(self._clock() // MINUTE_S)

    def _slot(self) -> Slot:
        number = self._number()
        if number > self._current.number:
            self._rotate(number)
        return self._current

    def observe(self, name: str, seconds: float) -> None:
        """One sample of the distribution ``name`` in the current minute (the hot path: O(1))."""
        self._slot().observe(name, seconds)

    def add(self, name: str, amount: float = 1.0) -> None:
        self._slot().add(name, amount)

    def _rotate(self, number: int) -> None:
        if self._current.counters or self._current.sketches:
            self._closed.append(_wire(self._current))
        oldest_ms = (number - self._keep + 1) * MINUTE_S * 1000
        while self._closed and self._closed[0]["minute_ms"] < oldest_ms:
            self._closed.popleft()
        self._current = Slot(number)

    def snapshot(self) -> list[dict[str, Any]]:
        """The minutes that saw anything, oldest first: ``minute_ms`` (the minute's start, Unix ms),
        ``counters`` and ``sketches`` (wire form); the current minute last, still counting."""
        current = self._slot()
        shown = list(self._closed)
        if current.counters or current.sketches:
            shown.append(_wire(current))
        return shown


def _wire(slot: Slot) -> dict[str, Any]:
    return {
        "minute_ms": slot.number * MINUTE_S * 1000,
        "counters": {k: v for k, v in slot.counters.items() if v},
        "sketches": {k: _coarse(s) for k, s in slot.sketches.items() if s.count},
    }


def _coarse(sketch: Sketch) -> dict[str, int]:
    wire: dict[str, int] = {}
    for index, n in sketch.buckets.items():
        key = str(index - index % COARSE + COARSE // 2)
        wire[key] = wire.get(key, 0) + n
    return wire
