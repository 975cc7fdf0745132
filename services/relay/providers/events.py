"""Server-sent events read incrementally: bytes in as they arrive, complete events' ``data`` out.

An event split across reads waits for its blank line; nothing else is buffered. ``\\r\\n`` line ends
(Google's) are read like ``\\n``.
"""

from __future__ import annotations

__all__ = ["EventReader"]


class EventReader:
    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The ``data`` of every event completed by ``data`` (multi-line data joined by ``\\n``)."""
        buffer = self._tail + data if self._tail else data
        if b"\r" in buffer:
            # A lone "\r" at the end may be half of a "\r\n": it stays in the tail, joined next time.
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._tail = buffer
            return []
        self._tail = buffer[end + 2 :]
        found: list[bytes] = []
        for event in buffer[:end].split(b"\n\n"):
            lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                continue  # a comment, or an event name without data
            if len(lines) == 1:
                found.append(_value(lines[0]))
            else:
                found.append(b"\n".join(_value(line) for line in lines))
        return found

    @property
    def pending(self) -> bool:
        """Whether an incomplete event is waiting for more bytes."""
        return bool(self._tail.strip())


def _value(line: bytes) -> bytes:
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value
