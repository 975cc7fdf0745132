"""A mergeable latency distribution: counts in fixed, log-spaced buckets (the DDSketch bucket scheme).

A value ``x`` falls in bucket ``i = ceil(log(x) / log(GAMMA))``, which covers ``(GAMMA**(i-1), GAMMA**i]``;
a quantile reports its bucket's representative ``2 * GAMMA**i / (GAMMA + 1)``, within a relative error of
``(GAMMA - 1) / (GAMMA + 1)`` of the true sample (``RELATIVE_ERROR``, 1 % here) whatever the distribution.
The buckets are the same everywhere, so sketches from many relays add bucket by bucket, and a sketch of
an older time slot subtracts from a window's total. Recording is one logarithm and one dict update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

GAMMA = 1.02
RELATIVE_ERROR = (GAMMA - 1) / (GAMMA + 1)
_INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
# Values at or below this (seconds) count in bucket 0 and report as 0: below any timer's resolution.
MIN_VALUE = 1e-6
_ZERO = -(2**31)


class Sketch:
    """Bucket counts of one distribution; values are seconds (any positive unit works)."""

    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, value: float) -> None:
        index = math.ceil(math.log(value) * _INV_LOG_GAMMA) if value > MIN_VALUE else _ZERO
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1

    def merge(self, other: Sketch | Mapping[int, int], *, sign: int = 1) -> None:
        """Add (``sign=1``) or take away (``sign=-1``) another sketch's counts."""
        counts = other.buckets if isinstance(other, Sketch) else other
        buckets = self.buckets
        for index, n in counts.items():
            left = buckets.get(index, 0) + sign * n
            if left:
                buckets[index] = left
            else:
                buckets.pop(index, None)
            self.count += sign * n

    def merge_wire(self, wire: Mapping[str, int]) -> None:
        """Add the counts of a sketch in its wire form (what the view does for every relay, every poll)."""
        buckets = self.buckets
        added = 0
        for index, n in wire.items():
            key = int(index)
            buckets[key] = buckets.get(key, 0) + n
            added += n
        self.count += added

    def quantile(self, q: float) -> float:
        """The value at rank ``q`` (0..1); 0.0 for an empty sketch."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: tuple[float, ...]) -> list[float]:
        """The values at ranks ``qs`` (ascending, 0..1) in one pass over the buckets."""
        if self.count <= 0:
            return [0.0 for _ in qs]
        found: list[float] = []
        ranks = iter(q * (self.count - 1) for q in qs)
        rank = next(ranks)
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            while seen > rank:
                found.append(value_of(index))
                rank = next(ranks, -1.0)
                if rank < 0:
                    return found
        top = value_of(max(self.buckets))
        return found + [top] * (len(qs) - len(found))

    def to_wire(self) -> dict[str, int]:
        """Compact JSON form: bucket index (as text) to count."""
        return {str(index): n for index, n in self.buckets.items()}

    @classmethod
    def from_wire(cls, wire: Mapping[str, int]) -> Sketch:
        sketch = cls()
        sketch.merge_wire(wire)
        return sketch


def value_of(index: int) -> float:
    """The representative value of bucket ``index``."""
    if index == _ZERO:
        return 0.0
    return 2.0 * GAMMA**index / (GAMMA + 1.0)
