"""Batch and BatchPolicy: closing by size and by time (on a manual clock), and offset bookkeeping."""

from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from services.common.batch import Batch, BatchPolicy
from services.common.clock import ManualClock
from services.common.pb.relaygate.events.v1.events_pb2 import UsageEvent
from tests.logger.factories import make_event

TP0 = TopicPartition("relaygate.usage", 0)
TP1 = TopicPartition("relaygate.usage", 1)


@pytest.mark.parametrize(
    ("max_rows", "max_seconds"),
    [
        pytest.param(0, 1.0, id="no rows"),
        pytest.param(-1, 1.0, id="negative rows"),
        pytest.param(10, 0.0, id="zero seconds"),
        pytest.param(10, -1.0, id="negative seconds"),
        pytest.param(10, float("nan"), id="nan seconds"),
    ],
)
def test_policy_refuses_nonsense(max_rows: int, max_seconds: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        BatchPolicy(max_rows=max_rows, max_seconds=max_seconds)


@pytest.mark.parametrize(
    ("rows", "elapsed", "closed"),
    [
        pytest.param(0, 0.0, False, id="empty batch"),
        pytest.param(0, 3600.0, False, id="empty batch never ages"),
        pytest.param(1, 0.0, False, id="open"),
        pytest.param(2, 0.999, False, id="just before the deadline"),
        pytest.param(1, 1.0, True, id="batch closed by time"),
        pytest.param(3, 0.0, True, id="batch closed by size"),
    ],
)
def test_batch_closes_by_size_or_time(rows: int, elapsed: float, closed: bool) -> None:
    clock = ManualClock()
    batch: Batch[UsageEvent] = Batch(BatchPolicy(max_rows=3, max_seconds=1.0), clock)
    for i in range(rows):
        batch.add(TP0, i, make_event("b", i))
    clock.advance(elapsed)
    assert batch.closed() is closed


def test_clock_starts_at_the_first_message() -> None:
    clock = ManualClock()
    batch: Batch[UsageEvent] = Batch(BatchPolicy(max_rows=10, max_seconds=1.0), clock)
    assert batch.seconds_left() is None
    clock.advance(5.0)
    batch.add(TP0, 0, make_event("b", 0))
    assert batch.seconds_left() == 1.0
    clock.advance(0.75)
    assert batch.seconds_left() == pytest.approx(0.25)
    batch.add(TP0, 1, make_event("b", 1))
    assert not batch.closed()
    clock.advance(0.25)
    assert batch.closed()
    assert batch.seconds_left() == 0.0


def test_full_batch_refuses_more() -> None:
    batch: Batch[UsageEvent] = Batch(BatchPolicy(max_rows=2, max_seconds=1.0), ManualClock())
    batch.add(TP0, 0, make_event("b", 0))
    assert batch.room == 1
    batch.add(TP0, 1, make_event("b", 1))
    assert batch.room == 0
    with pytest.raises(OverflowError):
        batch.add(TP0, 2, make_event("b", 2))
    assert len(batch) == 2


def test_offsets_are_the_next_to_consume_per_partition() -> None:
    batch: Batch[UsageEvent] = Batch(BatchPolicy(max_rows=10, max_seconds=1.0), ManualClock())
    assert batch.empty
    batch.add(TP0, 41, make_event("b", 0))
    batch.add(TP0, 42, make_event("b", 1))
    batch.add(TP1, 7, make_event("b", 2))
    assert batch.offsets == {TP0: 43, TP1: 8}
    # A re-read of an older position never moves the commit point back.
    batch.add(TP0, 40, make_event("b", 3))
    assert batch.offsets[TP0] == 43
    assert [e.event_id for e in batch.items] == ["b_000000", "b_000001", "b_000002", "b_000003"]


def test_skipped_messages_are_committed_without_rows() -> None:
    clock = ManualClock()
    batch: Batch[UsageEvent] = Batch(BatchPolicy(max_rows=10, max_seconds=1.0), clock)
    batch.skip(TP1, 99)
    assert not batch.empty
    assert len(batch) == 0
    assert batch.offsets == {TP1: 100}
    # A batch of only dead letters still closes by time, so its offsets get committed.
    clock.advance(1.0)
    assert batch.closed()
