"""One keep-alive HTTP/1.1 client connection: requests written as bytes, responses parsed by llhttp.

:class:`Http1Connection` stands where ``httpcore.AsyncHTTP11Connection`` stood in the relay's upstream
pool (:mod:`.transport`), with the same interface (``handle_async_request`` returning an
``httpcore.Response``, ``is_available``, ``has_expired``, ``is_idle``, ``is_closed``, ``aclose``) and
httpcore's exceptions. The difference is the parser: httpcore drives h11, pure Python, which costs
~15-30 µs of CPU per received chunk (two ``next_event`` calls through its state machine, plus three
async-generator levels); a model's stream is a hundred chunks or more, each arriving on its own.
httptools (llhttp, C; uvicorn's parser on the server side) does the same in under 1 µs.

What a response may be: ``Content-Length``, chunked, or (no framing) read until the server closes. A
``1xx`` answer before the real one is skipped. A response whose end is not known for sure, or after
which the server sent anything unasked, or that says ``Connection: close``, closes the connection
instead of returning it to the pool. Requests to answer with a body are sent with the body's own
framing (``Content-Length`` from the caller, or ``Transfer-Encoding: chunked``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator

import httpcore
import httptools

__all__ = ["Http1Connection"]

_READ_SIZE = 64 * 1024
_CHUNKED = b"chunked"


class _Idle:
    """Connection states (identity-compared)."""


_IDLE, _ACTIVE, _CLOSED = _Idle(), _Idle(), _Idle()


def _header_lines(request: httpcore.Request) -> tuple[bytes, bool]:
    """The request head and whether the body goes chunked; refuses headers that would split lines."""
    parts = [request.method, b" ", request.url.target, b" HTTP/1.1\r\n"]
    chunked = False
    for name, value in request.headers:
        if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name or b":" in name:
            raise httpcore.LocalProtocolError(f"illegal header {name!r}")
        if name.lower() == b"transfer-encoding" and value.lower() == _CHUNKED:
            chunked = True
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), chunked


class _Response:
    """Parser callbacks for one response; ``body`` holds what the parser delivered, not yet read."""

    __slots__ = ("body", "complete", "extra", "head_done", "headers", "keep_alive", "parser", "reason")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_done = False
        # Read with the head: llhttp resets what it knows of the message once it is complete.
        self.keep_alive = False
        self.complete = False
        # The server sent bytes beyond this response: the connection cannot carry another one.
        self.extra = False
        self.body: collections.deque[bytes] = collections.deque()

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_status(self, status: bytes) -> None:
        if not self.extra:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.extra:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.extra:
            self.head_done = True
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.extra:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.extra:
            return
        if 100 <= self.parser.get_status_code() < 200:
            # An informational answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = []
            self.reason = b""
            self.head_done = False
            return
        self.complete = True


class Http1Connection:
    """See the module docstring; one request at a time, reused while the server keeps it alive."""

    def __init__(self, stream: httpcore.AsyncNetworkStream, *, keepalive_expiry: float | None) -> None:
        self._stream = stream
        self._keepalive_expiry = keepalive_expiry
        self._state: _Idle = _IDLE
        self._expire_at: float | None = None

    # --- the pool's view ------------------------------------------------------------------------------

    def is_available(self) -> bool:
        return self._state is _IDLE

    def is_idle(self) -> bool:
        return self._state is _IDLE

    def is_closed(self) -> bool:
        return self._state is _CLOSED

    def has_expired(self) -> bool:
        if self._expire_at is not None and time.monotonic() > self._expire_at:
            return True
        # A server that closed an idle connection made it readable.
        return self._state is _IDLE and bool(self._stream.get_extra_info("is_readable"))

    async def aclose(self) -> None:
        if self._state is not _CLOSED:
            self._state = _CLOSED
            await self._stream.aclose()

    # --- one exchange ---------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._state is not _IDLE:
            raise httpcore.ConnectionNotAvailable()
        self._state = _ACTIVE
        self._expire_at = None
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        try:
            await self._send(request, timeouts.get("write"))
            response = _Response()
            read_timeout = timeouts.get("read")
            while not response.head_done:
                await self._feed(response, read_timeout, eof_ends=False)
        except BaseException:
            await self.aclose()
            raise
        parser = response.parser
        status = parser.get_status_code()
        headers = response.headers
        # No framing: the body runs to the end of the connection. A HEAD answer has none at all.
        until_eof = not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers
        ) and status not in (204, 304)
        if request.method == b"HEAD":
            response.complete = True
            until_eof = True  # llhttp would wait for the announced body: the connection is not reused
        # The caller may lower the read timeout once the head is in (a stream's idle timeout).
        body = _Body(self, response, timeouts, until_eof=until_eof)
        return httpcore.Response(
            status,
            headers=headers,
            content=body,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": response.reason,
                "network_stream": self._stream,
            },
        )

    async def _send(self, request: httpcore.Request, timeout: float | None) -> None:
        head, chunked = _header_lines(request)
        stream = self._stream
        await stream.write(head, timeout)
        async for part in request.stream:  # type: ignore[union-attr]
            if not part:
                continue
            await stream.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part, timeout)
        if chunked:
            await stream.write(b"0\r\n\r\n", timeout)

    async def _feed(self, response: _Response, timeout: float | None, *, eof_ends: bool) -> bool:
        """Read once and parse it; False when the server closed the connection (only where
        ``eof_ends``: the end of a body without framing)."""
        data = await self._stream.read(_READ_SIZE, timeout)
        if not data:
            if eof_ends:
                return False
            raise httpcore.RemoteProtocolError("the server closed the connection before the response ended")
        try:
            response.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise httpcore.RemoteProtocolError("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            raise httpcore.RemoteProtocolError(f"malformed response: {exc}") from None
        return True

    def _finished(self, response: _Response, *, reusable: bool) -> None:
        """The response was read to its end: back to the pool, or closed when it cannot be reused."""
        if self._state is _ACTIVE and reusable and not response.extra and response.keep_alive:
            self._state = _IDLE
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry
            return
        self._state = _CLOSED


class _Body:
    """The body of one response, as httpcore's stream interface: iterate once, then ``aclose``."""

    __slots__ = ("_closed", "_connection", "_ended", "_response", "_timeouts", "_until_eof")

    def __init__(
        self,
        connection: Http1Connection,
        response: _Response,
        timeouts: dict[str, float | None],
        *,
        until_eof: bool,
    ) -> None:
        self._connection = connection
        self._response = response
        self._timeouts = timeouts
        self._until_eof = until_eof
        self._ended = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        response = self._response
        body = response.body
        connection = self._connection
        timeout = self._timeouts.get("read")
        while True:
            while body:
                yield body.popleft()
            if response.complete:
                break
            if not await connection._feed(response, timeout, eof_ends=self._until_eof):
                break
        self._ended = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        response = self._response
        if self._ended and not self._until_eof and not response.body:
            connection._finished(response, reusable=True)
        else:
            # Unread, cut short, or delimited by the connection's end: nothing more can follow on it.
            connection._finished(response, reusable=False)
        # The parser and its callbacks refer to each other: unlinked, reference counting frees both
        # now rather than the cycle collector later.
        del response.parser
        if connection.is_closed():
            await connection._stream.aclose()
