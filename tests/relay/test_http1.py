"""The upstream HTTP/1.1 connection (llhttp): response framings, reuse, and failures, against a
scripted server on a loopback socket that answers each request with bytes given by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import httpcore
import httpx
import pytest

from services.relay.upstream.transport import ChannelTransport

OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


class ScriptedServer:
    """Answers the n-th request on any connection with ``answers[n]`` (a list of writes, a short pause
    between them, so the client reads them apart), then closes the connection when told to."""

    def __init__(self, answers: list[list[bytes]], *, close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                for part in self.answers[len(self.requests) - 1]:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


@runtime_checkable
class Closable(Protocol):
    """A raw response stream from the pool (httpcore types it as any byte iterable)."""

    async def aclose(self) -> None: ...


def pool(server: ScriptedServer) -> ChannelTransport:
    return ChannelTransport(
        f"http://127.0.0.1:{server.port}", max_connections=2, max_idle=2, keepalive_expiry=30
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def post(transport: ChannelTransport, body: bytes = b"{}") -> tuple[int, list[bytes]]:
    """POST through the relay's own path (``open``), returning the status and the parts as read."""
    request = httpcore.Request(
        b"POST",
        transport.url(b"/v1/chat/completions"),
        headers=[(b"host", b"upstream"), (b"content-length", b"%d" % len(body))],
        content=body,
        extensions={"timeout": {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}},
    )
    response, stream = await transport.open(request)
    try:
        parts = [part async for part in stream]
    finally:
        await stream.aclose()
    return response.status, parts


async def test_a_chunked_stream_arrives_chunk_by_chunk_and_the_connection_is_reused() -> None:
    events = [b"data: %d\n\n" % i for i in range(5)]
    answer = [OK_HEAD + b"transfer-encoding: chunked\r\n\r\n", *map(chunk, events), b"0\r\n\r\n"]
    async with ScriptedServer([answer, answer]).running() as server:
        transport = pool(server)
        for _ in range(2):
            status, parts = await post(transport, b'{"stream":true}')
            assert status == 200
            assert parts == events
        assert server.connections == 1
        assert server.requests[0].endswith(b'\r\n\r\n{"stream":true}')
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\n")
        await transport.aclose()


async def test_a_response_split_anywhere_parses_the_same() -> None:
    whole = OK_HEAD + b"content-length: 11\r\nx-two: a\r\nx-two: b\r\n\r\nhello world"
    async with ScriptedServer([[whole[i : i + 3] for i in range(0, len(whole), 3)]]).running() as server:
        transport = pool(server)
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://127.0.0.1:{server.port}"
        ) as client:
            response = await client.post("/v1/x", content=b"{}")
            assert response.status_code == 200
            assert response.content == b"hello world"
            assert response.headers.get_list("x-two") == ["a", "b"]
            assert transport.stats().idle == 1


async def test_an_informational_answer_before_the_real_one_is_skipped() -> None:
    answer = [b"HTTP/1.1 100 Continue\r\n\r\n", OK_HEAD + b"content-length: 2\r\n\r\nok"]
    async with ScriptedServer([answer]).running() as server:
        transport = pool(server)
        assert await post(transport) == (200, [b"ok"])
        assert transport.stats().idle == 1
        await transport.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        # The server says it closes.
        [OK_HEAD + b"connection: close\r\ncontent-length: 2\r\n\r\nok"],
        # HTTP/1.0 without keep-alive.
        [b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        # Bytes nobody asked for after the response.
        [OK_HEAD + b"content-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"],
    ],
)
async def test_a_connection_that_cannot_carry_another_request_is_not_pooled(answer: list[bytes]) -> None:
    async with ScriptedServer([answer]).running() as server:
        transport = pool(server)
        status, parts = await post(transport)
        assert (status, b"".join(parts)) == (200, b"ok")
        stats = transport.stats()
        assert (stats.connections, stats.idle) == (0, 0)
        await transport.aclose()


async def test_a_body_without_framing_runs_to_the_end_of_the_connection() -> None:
    answer = [OK_HEAD + b"\r\n", b"data: 1\n\n", b"data: 2\n\n"]
    async with ScriptedServer([answer], close_after=True).running() as server:
        transport = pool(server)
        status, parts = await post(transport)
        assert (status, b"".join(parts)) == (200, b"data: 1\n\ndata: 2\n\n")
        assert transport.stats().connections == 0
        await transport.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        [OK_HEAD + b"content-length: 10\r\n\r\nshort"],
        [OK_HEAD + b"transfer-encoding: chunked\r\n\r\n", chunk(b"data: 1\n\n")],
    ],
)
async def test_a_body_cut_short_is_a_protocol_error(answer: list[bytes]) -> None:
    async with ScriptedServer([answer], close_after=True).running() as server:
        transport = pool(server)
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport)
        assert transport.stats().connections == 0
        await transport.aclose()


async def test_a_malformed_answer_is_a_protocol_error() -> None:
    async with ScriptedServer([[b"HTTP/1.1 abc\r\n\r\n"]]).running() as server:
        transport = pool(server)
        with pytest.raises(httpx.RemoteProtocolError):
            await post(transport)
        await transport.aclose()


async def test_a_header_that_would_split_the_request_is_refused_before_sending() -> None:
    async with ScriptedServer([]).running() as server:
        transport = pool(server)
        request = httpcore.Request(
            b"POST",
            transport.url(b"/v1/x"),
            headers=[(b"host", b"upstream"), (b"x-bad", b"a\r\nx-injected: 1"), (b"content-length", b"0")],
            content=b"",
        )
        with pytest.raises(httpx.LocalProtocolError):
            await transport.open(request)
        assert server.requests == []
        await transport.aclose()


async def test_the_read_timeout_lowered_after_the_head_applies_to_the_body() -> None:
    # The relay lowers "read" to the stream's idle timeout once the head is in.
    answer = [OK_HEAD + b"transfer-encoding: chunked\r\n\r\n", chunk(b"data: 1\n\n")]
    async with ScriptedServer([answer]).running() as server:
        transport = pool(server)
        timeouts: dict[str, float | None] = {"connect": 2.0, "read": 30.0, "write": 2.0, "pool": 2.0}
        request = httpcore.Request(
            b"POST",
            transport.url(b"/v1/x"),
            headers=[(b"host", b"upstream"), (b"content-length", b"0")],
            content=b"",
            extensions={"timeout": timeouts},
        )
        response, stream = await transport.open(request)
        timeouts["read"] = 0.2
        parts: list[bytes] = []
        with pytest.raises(httpx.ReadTimeout):
            async with asyncio.timeout(10):
                async for part in stream:
                    parts.append(part)
        await stream.aclose()
        assert response.status == 200
        assert parts == [b"data: 1\n\n"]
        assert transport.stats().connections == 0
        await transport.aclose()


async def test_closing_a_body_twice_leaves_the_pooled_connection_alone() -> None:
    answer = [OK_HEAD + b"content-length: 2\r\n\r\nok"]
    async with ScriptedServer([answer, answer]).running() as server:
        transport = pool(server)
        request = httpcore.Request(
            b"POST",
            transport.url(b"/v1/x"),
            headers=[(b"host", b"upstream"), (b"content-length", b"0")],
            content=b"",
        )
        response, stream = await transport.open(request)
        first = response.stream
        assert isinstance(first, Closable)
        assert [part async for part in stream] == [b"ok"]
        await stream.aclose()
        await first.aclose()
        assert transport.stats().idle == 1
        assert await post(transport) == (200, [b"ok"])
        assert server.connections == 1
        await transport.aclose()
