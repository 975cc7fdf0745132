"""One batch of a Kafka consumer: decoded items plus the offsets that become committable once they are
stored.

A batch opens with its first message and closes when it holds ``max_rows`` items or ``max_seconds``
have passed on the injected :class:`~services.common.clock.Clock`, whichever comes first. Offsets are
tracked per partition as the *next* offset to consume (Kafka's commit convention), and they include
messages that produced no item (dead-lettered or ignored ones), so those are committed along with the
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from aiokafka.structs import TopicPartition

from services.common.clock import Clock

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch is written: at ``max_rows`` items, or ``max_seconds`` after its first message."""

    max_rows: int
    max_seconds: float

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {self.max_rows}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")


class Batch(Generic[T]):
    """Items waiting to be written, and the offsets to commit after they are.

    Not thread-safe; one consumer loop owns it. A written batch is discarded, never reused.
    """

    __slots__ = ("_clock", "_items", "_offsets", "_opened_at", "policy")

    def __init__(self, policy: BatchPolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._items: list[T] = []
        self._offsets: dict[TopicPartition, int] = {}
        self._opened_at: float | None = None

    def add(self, tp: TopicPartition, offset: int, item: T) -> None:
        """Take the item read at ``offset`` of ``tp``; the batch must have :attr:`room`."""
        if len(self._items) >= self.policy.max_rows:
            raise OverflowError(f"batch is full ({self.policy.max_rows} rows); write it first")
        self._items.append(item)
        self._advance(tp, offset)

    def skip(self, tp: TopicPartition, offset: int) -> None:
        """Account for a message that yields no item (dead-lettered, ignored): its offset is committed all
        the same."""
        self._advance(tp, offset)

    def _advance(self, tp: TopicPartition, offset: int) -> None:
        if self._opened_at is None:
            self._opened_at = self._clock.monotonic()
        # max(): a partition re-read from an older position must never move the commit point back.
        self._offsets[tp] = max(self._offsets.get(tp, 0), offset + 1)

    @property
    def items(self) -> list[T]:
        return self._items

    @property
    def offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the next offset to consume: what to commit once the items are stored."""
        return dict(self._offsets)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def empty(self) -> bool:
        """No items and no offsets: nothing to write or commit."""
        return not self._offsets

    @property
    def room(self) -> int:
        return self.policy.max_rows - len(self._items)

    def seconds_left(self) -> float | None:
        """Time until the batch closes by age; ``None`` while it is empty (the clock has not started)."""
        if self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self.policy.max_seconds - self._clock.monotonic())

    def closed(self) -> bool:
        """Full, or old enough (now, on the clock): time to write it."""
        if self.room <= 0:
            return True
        left = self.seconds_left()
        return left is not None and left <= 0
