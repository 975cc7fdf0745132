"""Upstream connections on the event loop's native transports: an httpcore network backend.

httpcore's default backend goes through anyio: every read and write runs inside a cancel scope, socket
state is queried through a dictionary of lambdas (one readability ``poll()`` per pooled connection per
request in the stock pool), and TLS is done in Python over memory BIOs. :class:`AsyncioBackend` uses
``loop.create_connection`` / ``loop.start_tls`` instead, which under uvloop are C code, TLS included:

* a read waits on one future, with the timeout as a plain timer handle;
* "is the idle connection readable?" (has the server closed it?) is a flag the protocol sets;
* writes made before the response is read are sent as one segment (``cork``), so a request costs
  one ``send()`` instead of one per header block and body.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore

__all__ = ["AsyncioBackend"]

# Reading from the socket pauses while this much is buffered and not consumed, and resumes below a
# quarter of it: a slow reader never makes the relay hold more than this per connection.
_HIGH_WATER = 256 * 1024
# Corked writes are flushed before they grow past this.
_CORK_LIMIT = 64 * 1024


class _Protocol(asyncio.Protocol):
    """Buffers what the socket delivers and wakes the one reader waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _wake_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None and not writer.done():
            writer.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Await ``waiter``, raising ``TimeoutError`` after ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        await waiter
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()


class _Stream(httpcore.AsyncNetworkStream):
    """One connection on an asyncio transport (plain TCP, or TLS after :meth:`start_tls`).

    With ``cork``, writes are held until the next read (or until they reach ``_CORK_LIMIT``); only
    for HTTP/1.1, where a request's writes are always followed by reading its response.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol, *, cork: bool) -> None:
        self._transport = transport
        self._protocol = protocol
        self._cork = cork
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if self._pending:
            self._flush()
        if not protocol.buffer:
            if not protocol.eof:
                waiter = asyncio.get_running_loop().create_future()
                protocol.reader = waiter
                try:
                    await wait(waiter, timeout)
                except TimeoutError:
                    raise httpcore.ReadTimeout("timed out waiting for the upstream") from None
                finally:
                    protocol.reader = None
            if not protocol.buffer:
                if protocol.error is not None:
                    raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
                return b""
        data = protocol.buffer.popleft()
        if len(data) > max_bytes:
            protocol.buffer.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        protocol.buffered -= len(data)
        if protocol.read_paused and protocol.buffered <= _HIGH_WATER // 4:
            protocol.read_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._transport.is_closing():
            raise httpcore.WriteError("the upstream connection is closed")
        if self._cork:
            self._pending.append(buffer)
            self._pending_bytes += len(buffer)
            if self._pending_bytes < _CORK_LIMIT:
                return
            self._flush()
        else:
            self._transport.write(buffer)
        protocol = self._protocol
        if protocol.write_paused:
            waiter = asyncio.get_running_loop().create_future()
            protocol.writer = waiter
            try:
                await wait(waiter, timeout)
            except TimeoutError:
                raise httpcore.WriteTimeout("timed out writing to the upstream") from None
            if protocol.error is not None:
                raise httpcore.WriteError(str(protocol.error))

    def _flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    async def aclose(self) -> None:
        self._pending.clear()
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport,
                self._protocol,
                ssl_context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout("the TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None:  # the loop's contract allows it; a closed transport is useless anyway
            raise httpcore.ConnectError("the TLS handshake failed")
        return _Stream(transport, self._protocol, cork=self._cork)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle keep-alive connection with anything to read has been closed by the server.
            return self._protocol.eof or bool(self._protocol.buffer)
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend on the running loop's transports; ``cork`` is for HTTP/1.1 only."""

    def __init__(self, *, cork: bool = False) -> None:
        self._cork = cork

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return _Stream(transport, protocol, cork=self._cork)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {path} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Stream(transport, protocol, cork=self._cork)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
