"""The harness's own HTTP/1.1 client, for what wrk cannot measure: time to first byte of a stream, an
open-loop fixed request rate, and thousands of streams held open at once.

Raw asyncio streams, keep-alive, prebuilt request bytes; the response is parsed only as far as framing
needs (status line, ``content-length`` or chunked encoding). Run it on uvloop (:func:`run`) so the client
costs little next to the servers it measures.

Limits: event-loop timers have millisecond granularity (libuv, and epoll's timeout), so the fixed-rate
scheduler sends each request up to ~1 ms after its due time. Since the loop never waits for answers
before sending (open loop, new connections when all are busy), a late answer never delays later sends,
and latency is measured from the moment a request's bytes are written; the send lag is reported on its
own so that a saturated client is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "Connection",
    "FixedRateResult",
    "Reply",
    "StreamsResult",
    "build_request",
    "fixed_rate",
    "hold_streams",
    "probe",
    "run",
]

T = TypeVar("T")

_DONE_MARK = b"[DONE]"
# uvicorn closes keep-alive connections idle for 5 s; reusing one that old may race that close.
_STALE_AFTER_S = 2.0


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when installed (it is, with uvicorn[standard]), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def build_request(
    host: str,
    port: int,
    path: str,
    body: bytes,
    api_key: str | None,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The bytes of one ``POST path`` with a JSON body on a keep-alive connection, plus ``headers``."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class Reply:
    """One request's outcome; times are seconds from the moment its bytes were written."""

    status: int
    ttfb_s: float
    total_s: float
    done: bool  # a length-framed body arrived whole, or a chunked one ended with a ``[DONE]`` event


class ProtocolError(RuntimeError):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection; not safe for concurrent requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True
        self.last_used = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    @classmethod
    async def open(cls, host: str, port: int, timeout_s: float = 10) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout_s)
        return cls(reader, writer)

    def close(self) -> None:
        self.reusable = False
        with contextlib.suppress(Exception):
            self.writer.close()

    async def send(self, request: bytes, *, on_first_byte: Callable[[], None] | None = None) -> Reply:
        """Write ``request`` and read its whole response."""
        reader = self.reader
        started = time.perf_counter()
        self.writer.write(request)
        status_line = await reader.readline()
        if not status_line:
            raise ProtocolError("connection closed before the status line")
        status = int(status_line.split(b" ", 2)[1])
        length = -1
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value.strip())
            elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif lowered == b"connection" and b"close" in value.lower():
                self.reusable = False
        ttfb = 0.0
        done = False
        if chunked:
            tail = b""
            while True:
                size_line = await reader.readline()
                if not ttfb:
                    ttfb = time.perf_counter() - started
                    if on_first_byte is not None:
                        on_first_byte()
                if not size_line:
                    raise ProtocolError("connection closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    await reader.readline()  # the empty trailer section
                    break
                data = await reader.readexactly(size + 2)
                tail = (tail + data)[-64:]
            done = _DONE_MARK in tail
        elif length > 0:
            await reader.readexactly(1)
            ttfb = time.perf_counter() - started
            if on_first_byte is not None:
                on_first_byte()
            await reader.readexactly(length - 1)
            done = True
        elif length == 0:
            ttfb = time.perf_counter() - started
            done = True
        else:  # body delimited by the connection closing
            self.reusable = False
            await reader.read()
            ttfb = time.perf_counter() - started
            done = True
        self.last_used = time.monotonic()
        return Reply(status, ttfb, time.perf_counter() - started, done)


# --- closed loop: time to first byte ------------------------------------------------------------------


async def probe(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    connections: int,
    duration_s: float,
    pause_s: float = 0.0,
    start_delay_s: float = 0.0,
) -> tuple[list[Reply], int]:
    """Each of ``connections`` sends requests one after the other (pausing ``pause_s`` between them)
    until ``duration_s`` after ``start_delay_s``; returns the replies and the number of failures."""
    replies: list[Reply] = []
    errors = 0
    await asyncio.sleep(start_delay_s)
    deadline = time.perf_counter() + duration_s

    async def loop(offset: int) -> None:
        nonlocal errors
        index = offset
        connection: Connection | None = None
        while time.perf_counter() < deadline:
            try:
                if connection is None or not connection.reusable:
                    connection = await Connection.open(host, port)
                replies.append(await asyncio.wait_for(connection.send(requests[index % len(requests)]), 30))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError, ValueError):
                errors += 1
                if connection is not None:
                    connection.close()
                connection = None
                await asyncio.sleep(0.01)
            index += 1
            if pause_s:
                await asyncio.sleep(pause_s)
        if connection is not None:
            connection.close()

    await asyncio.gather(*(loop(i * 7919) for i in range(connections)))
    return replies, errors


# --- open loop: a fixed request rate ------------------------------------------------------------------


@dataclass
class FixedRateResult:
    scheduled: int
    latencies_s: list[float] = field(default_factory=list)  # from the moment its bytes were written
    ttfb_s: list[float] = field(default_factory=list)  # to the first body byte, same origin
    send_lag_s: list[float] = field(default_factory=list)  # how late each send was against its due time
    errors: int = 0
    non_2xx: int = 0
    max_connections_used: int = 0
    wall_s: float = 0.0


async def fixed_rate(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration_s: float,
    max_connections: int = 2000,
    timeout_s: float = 30,
) -> FixedRateResult:
    """Send ``rate`` requests per second for ``duration_s`` whatever the answers' pace (open loop).

    A request finding no idle connection opens a new one (up to ``max_connections``), so slow answers
    raise concurrency instead of lowering the rate.
    """
    total = max(1, int(rate * duration_s))
    result = FixedRateResult(scheduled=total)
    idle: deque[Connection] = deque()
    opened = 0
    slots = asyncio.Semaphore(max_connections)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        async with slots:
            connection = idle.pop() if idle else None
            try:
                if connection is not None and connection.idle_for() > _STALE_AFTER_S:
                    connection.close()  # the server may be closing it right now (keep-alive timeout)
                    opened -= 1
                    connection = None
                if connection is None:
                    connection = await Connection.open(host, port)
                    opened += 1
                    result.max_connections_used = max(result.max_connections_used, opened)
                result.send_lag_s.append(time.perf_counter() - due)
                reply = await asyncio.wait_for(connection.send(request), timeout_s)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError, ValueError):
                result.errors += 1
                if connection is not None:
                    connection.close()
                    opened -= 1
                return
            result.latencies_s.append(reply.total_s)
            result.ttfb_s.append(reply.ttfb_s)
            if not 200 <= reply.status < 300:
                result.non_2xx += 1
            if connection.reusable:
                idle.append(connection)
            else:
                connection.close()
                opened -= 1

    started = time.perf_counter()
    for index in range(total):
        due = started + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(requests[index % len(requests)], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 5)
    result.wall_s = time.perf_counter() - started
    for connection in idle:
        connection.close()
    return result


# --- many streams held open at once -------------------------------------------------------------------


@dataclass
class StreamsResult:
    wanted: int
    started: int = 0  # got the first body byte
    completed: int = 0  # ended with [DONE]
    failed: int = 0
    peak_open: int = 0  # most streams between first byte and end at the same moment
    time_to_all_open_s: float | None = None
    ttfb_s: list[float] = field(default_factory=list)


async def hold_streams(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    count: int,
    open_rate: float,
    timeout_s: float,
    sample: Callable[[int], Awaitable[None]] | None = None,
) -> StreamsResult:
    """Open ``count`` streaming requests, one connection each, at ``open_rate`` per second; wait for all.

    ``sample(open_streams)`` is awaited every 0.25 s while streams run (to record memory, say).
    """
    result = StreamsResult(wanted=count)
    open_now = 0
    started = time.perf_counter()

    def first_byte() -> None:
        nonlocal open_now
        open_now += 1
        result.started += 1
        result.peak_open = max(result.peak_open, open_now)
        if result.started == count:
            result.time_to_all_open_s = time.perf_counter() - started

    async def one(request: bytes) -> None:
        nonlocal open_now
        connection: Connection | None = None
        got_first = False

        def mark() -> None:
            nonlocal got_first
            got_first = True
            first_byte()

        try:
            connection = await Connection.open(host, port, timeout_s=30)
            reply = await connection.send(request, on_first_byte=mark)
            result.ttfb_s.append(reply.ttfb_s)
            if reply.status == 200 and reply.done:
                result.completed += 1
            else:
                result.failed += 1
        except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError):
            result.failed += 1
        finally:
            if got_first:
                open_now -= 1
            if connection is not None:
                connection.close()

    async def sampler() -> None:
        while True:
            if sample is not None:
                await sample(open_now)
            await asyncio.sleep(0.25)

    sampling = asyncio.create_task(sampler())
    tasks: list[asyncio.Task[None]] = []
    try:
        for index in range(count):
            due = started + index / open_rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(requests[index % len(requests)])))
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        result.failed += len(pending)
        if pending:
            await asyncio.wait(pending, timeout=5)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    return result
