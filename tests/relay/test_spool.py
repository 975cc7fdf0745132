"""The on-disk spool behind the usage-event publisher."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from services.relay.meter.spool import Spool


def records(start: int, count: int) -> list[tuple[bytes, bytes]]:
    return [(b"key_%d" % (i % 3), b"event-%06d" % i) for i in range(start, start + count)]


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=200)
    spool.open()
    for start in range(0, 100, 10):
        assert spool.append(records(start, 10)) == 10
    assert spool.records == 100
    seen: list[tuple[bytes, bytes]] = []
    while spool.records:
        batch = spool.peek(7)
        seen.extend(batch)
        spool.commit(len(batch))
    assert seen == records(0, 100)
    assert spool.size == 0
    assert list(tmp_path.rglob("*.seg")) == []
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_peek_does_not_consume(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.open()
    spool.append(records(0, 5))
    assert spool.peek(3) == spool.peek(3) == records(0, 3)
    spool.commit(2)
    assert spool.peek(10) == records(2, 3)
    spool.close()


def test_the_spool_is_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    spool.open()
    written = spool.append(records(0, 50))
    assert 0 < written < 50
    assert spool.size <= 100
    assert spool.append(records(50, 1)) == 0
    spool.close()


def test_a_dead_processs_spool_is_adopted_and_a_live_ones_is_not(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=10_000)
    first.open()
    first.append(records(0, 4))
    first.close()  # left on disk: not empty

    # Another process that is still running holds the lock of its own directory.
    alive = tmp_path / "999999-alive"
    alive.mkdir()
    fd = os.open(alive / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        second = Spool(tmp_path, max_bytes=10_000)
        second.open()
        assert second.records == 4
        second.append(records(4, 2))
        assert second.peek(10) == records(0, 6)
        assert alive.exists()
        second.commit(6)
        second.close()
    finally:
        os.close(fd)


def test_a_record_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.open()
    spool.append(records(0, 3))
    spool.close()
    segment = next(tmp_path.rglob("*.seg"))
    with segment.open("ab") as file:
        file.write(b"\x00\x05\x00\x00")  # half a header
    adopted = Spool(tmp_path, max_bytes=10_000)
    adopted.open()
    assert adopted.peek(10) == records(0, 3)
    adopted.commit(3)
    adopted.close()
