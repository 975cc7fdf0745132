"""A bounded FIFO of records on disk, for usage events that cannot reach Kafka yet.

Records are ``(key, payload)`` pairs appended to segment files (``<16-digit number>.seg``) as
``key length (u16), payload length (u32), key, payload``. Each process writes its own directory
under the spool root and holds an ``flock`` on it, so two relays on one host never share one; a
directory whose lock is free belongs to a process that is gone, and the next :meth:`Spool.open`
adopts it: its records are replayed first. A record cut short by a crash mid-write is skipped.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

from services.common.telemetry import METRICS

__all__ = ["Record", "Spool"]

log = logging.getLogger(__name__)

# (key, encoded event)
Record = tuple[bytes, bytes]

_HEADER = struct.Struct(">HI")
_SEGMENT_BYTES = 8 * 1024 * 1024
_LOCK_FILE = "lock"


class Spool:
    """See the module docstring. ``max_bytes`` bounds the records held; not thread-safe."""

    def __init__(
        self, root: Path, *, max_bytes: int, segment_bytes: int = _SEGMENT_BYTES, exported: bool = True
    ) -> None:
        self._root = root
        # Whether this spool is the one the events_spooled gauges describe (the settlement journal
        # uses the same format but is not that spool).
        self._exported = exported
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        # Segment numbers in order; the last one is being written.
        self._segments: collections.deque[int] = collections.deque()
        self._write_fd: int | None = None
        self._write_size = 0
        self._read_offset = 0
        self.records = 0
        self.size = 0

    def open(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        self._dir = self._root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._dir.mkdir()
        self._lock_fd = _lock(self._dir)
        assert self._lock_fd is not None
        # Process directories only (``<pid>-<hex>``): other state may live beside them.
        orphans = (p for p in self._root.iterdir() if p.is_dir() and p != self._dir and p.name[:1].isdigit())
        for orphan in sorted(orphans):
            self._adopt(orphan)
        self._report()
        if self.records:
            log.info("spooled events found", extra={"records": self.records, "bytes": self.size})

    def _adopt(self, orphan: Path) -> None:
        fd = _lock(orphan)
        if fd is None:
            return  # a live process owns it
        try:
            assert self._dir is not None
            for segment in sorted(orphan.glob("*.seg")):
                records, size = _count(segment)
                if records:
                    number = self._next_number()
                    segment.rename(self._dir / f"{number:016d}.seg")
                    self._segments.append(number)
                    self.records += records
                    self.size += size
                else:
                    segment.unlink()
            (orphan / _LOCK_FILE).unlink(missing_ok=True)
            orphan.rmdir()
        except OSError:
            log.exception("could not adopt the spool at %s", orphan)
        finally:
            os.close(fd)

    def _next_number(self) -> int:
        return self._segments[-1] + 1 if self._segments else 1

    def _path(self, number: int) -> Path:
        assert self._dir is not None
        return self._dir / f"{number:016d}.seg"

    def append(self, records: list[Record]) -> int:
        """Write ``records`` at the end; returns how many fit (the rest would exceed the bound)."""
        written = 0
        chunks: list[bytes] = []
        for key, payload in records:
            size = _HEADER.size + len(key) + len(payload)
            if self.size + size > self._max_bytes:
                break
            chunks.append(_HEADER.pack(len(key), len(payload)) + key + payload)
            self.size += size
            written += 1
        if chunks:
            data = b"".join(chunks)
            if self._write_fd is None or self._write_size >= self._segment_bytes:
                self._rotate()
            assert self._write_fd is not None
            os.write(self._write_fd, data)
            self._write_size += len(data)
            self.records += written
            self._report()
        return written

    def _rotate(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
        number = self._next_number()
        self._write_fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._write_size = 0
        self._segments.append(number)

    def peek(self, limit: int) -> list[Record]:
        """Up to ``limit`` records from the front, without removing them (see :meth:`commit`)."""
        found: list[Record] = []
        offset = self._read_offset
        for number in self._segments:
            for record, _end in _read(self._path(number), offset):
                found.append(record)
                if len(found) >= limit:
                    return found
            offset = 0
        return found

    def commit(self, count: int) -> None:
        """Remove the first ``count`` records (they reached the broker)."""
        while count > 0 and self._segments:
            number = self._segments[0]
            path = self._path(number)
            end = self._read_offset
            for (key, payload), after in _read(path, self._read_offset):
                count -= 1
                self.records -= 1
                self.size -= _HEADER.size + len(key) + len(payload)
                end = after
                if count == 0:
                    break
            self._read_offset = end
            writing = number == self._segments[-1] and self._write_fd is not None
            if count > 0 or (not writing and _exhausted(path, end)):
                self._drop_front()
        if self.records <= 0:
            # Empty: start over with no files at all rather than a consumed segment.
            while self._segments:
                self._drop_front()
            self.records = self.size = 0
        self._report()

    def _drop_front(self) -> None:
        number = self._segments.popleft()
        if not self._segments and self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        self._path(number).unlink(missing_ok=True)
        self._read_offset = 0

    def sync(self) -> None:
        if self._write_fd is not None:
            os.fsync(self._write_fd)

    def close(self) -> None:
        """Flush to disk and release the directory (removed when empty)."""
        if self._write_fd is not None:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = None
        if self._dir is not None and self.records == 0:
            for segment in self._dir.glob("*.seg"):
                segment.unlink()
            (self._dir / _LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._dir.rmdir()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _report(self) -> None:
        if not self._exported:
            return
        METRICS.events_spooled.set(self.records)
        METRICS.events_spool_bytes.set(self.size)


def _lock(directory: Path) -> int | None:
    """An exclusive lock on ``directory`` (held while the fd is open); None when someone holds it."""
    fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _read(path: Path, offset: int, *, block: int = 1024 * 1024) -> Iterator[tuple[Record, int]]:
    """Complete records of a segment from ``offset``, each with the offset just after it; a record
    cut short by a crash mid-write ends the iteration."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        file.seek(offset)
        buffer = b""
        while more := file.read(block):
            buffer += more
            position = 0
            while len(buffer) - position >= _HEADER.size:
                key_len, payload_len = _HEADER.unpack_from(buffer, position)
                start = position + _HEADER.size
                end = start + key_len + payload_len
                if end > len(buffer):
                    break
                offset += end - position
                yield (buffer[start : start + key_len], buffer[start + key_len : end]), offset
                position = end
            buffer = buffer[position:]


def _exhausted(path: Path, offset: int) -> bool:
    try:
        return path.stat().st_size <= offset
    except FileNotFoundError:
        return True


def _count(path: Path) -> tuple[int, int]:
    records = size = 0
    for (key, payload), _end in _read(path, 0):
        records += 1
        size += _HEADER.size + len(key) + len(payload)
    return records, size
