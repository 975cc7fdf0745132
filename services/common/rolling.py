"""Rolling windows (last 1 min / 5 min / 1 h) of counters and latency sketches, kept in process.

Time is cut into slots of ``SLOT_S`` seconds. Recording touches only the current slot; when the slot
changes, the finished one is added to every window's running total and the slots that fell out of a
window are taken away from it, so reading a window costs one merge of its total with the current slot,
never a pass over an hour of slots. A window therefore covers its length give or take one slot; it
reports the seconds it really covers, which rates divide by.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.sketch import Sketch

SLOT_S = 10.0
# Window name -> length in seconds.
WINDOWS: dict[str, float] = {"1m": 60.0, "5m": 300.0, "1h": 3600.0}


@dataclass(slots=True)
class Slot:
    number: int
    counters: dict[str, float] = field(default_factory=dict)
    sketches: dict[str, Sketch] = field(default_factory=dict)

    def observe(self, name: str, seconds: float) -> None:
        sketch = self.sketches.get(name)
        if sketch is None:
            sketch = self.sketches[name] = Sketch()
        sketch.add(seconds)

    def add(self, name: str, amount: float) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + amount

    def absorb(self, other: Slot, *, sign: int = 1) -> None:
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0.0) + sign * value
        for name, sketch in other.sketches.items():
            mine = self.sketches.get(name)
            if mine is None:
                mine = self.sketches[name] = Sketch()
            mine.merge(sketch, sign=sign)


class Rolling:
    """Counters and sketches over the last 1 min, 5 min and 1 h (one event loop; no locking)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, slot_s: float = SLOT_S) -> None:
        self._clock = clock
        self._slot_s = slot_s
        self._started = clock()
        self._current = Slot(self._slot_number())
        self._closed: deque[Slot] = deque()
        # Per window: its length in slots (the current one included) and the total of its closed slots.
        self._spans = {name: max(1, round(length / slot_s)) for name, length in WINDOWS.items()}
        self._totals = {name: Slot(0) for name in WINDOWS}

    def _slot_number(self) -> int:
        return int(self._clock() // self._slot_s)

    def _slot(self) -> Slot:
        number = self._slot_number()
        if number != self._current.number:
            self._rotate(number)
        return self._current

    def observe(self, name: str, seconds: float) -> None:
        """One sample of the distribution ``name`` (the hot path: O(1))."""
        self._slot().observe(name, seconds)

    def add(self, name: str, amount: float = 1.0) -> None:
        self._slot().add(name, amount)

    def _rotate(self, number: int) -> None:
        finished = self._current
        self._closed.append(finished)
        for name, total in self._totals.items():
            total.absorb(finished)
            first = number - self._spans[name] + 1
            # Slots of this window that are now too old: those in [previous first, first).
            for slot in self._closed:
                if slot.number >= first:
                    break
                if slot.number >= total.number:
                    total.absorb(slot, sign=-1)
            total.number = first
        oldest = number - max(self._spans.values()) + 1
        while self._closed and self._closed[0].number < oldest:
            self._closed.popleft()
        self._current = Slot(number)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per window: ``seconds`` covered, ``counters`` and ``sketches`` (wire form)."""
        self._slot()
        now = self._clock()
        into_slot = now - self._current.number * self._slot_s
        shown: dict[str, dict[str, Any]] = {}
        for name, total in self._totals.items():
            merged = Slot(0)
            merged.absorb(total)
            merged.absorb(self._current)
            span = (self._spans[name] - 1) * self._slot_s + into_slot
            shown[name] = {
                "seconds": round(min(span, now - self._started), 3),
                "counters": {k: v for k, v in merged.counters.items() if v},
                "sketches": {k: s.to_wire() for k, s in merged.sketches.items() if s.count},
            }
        return shown
