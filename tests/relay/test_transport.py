"""The channel transport against a real (fake) upstream on loopback: pooling, limits, failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator

import httpcore
import httpx
import orjson
import pytest

from services.fake_upstream import FakeUpstream
from services.relay.upstream.transport import ChannelTransport, UpstreamBody

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(upstream: FakeUpstream) -> None:
    upstream.reset()


def transport(upstream: FakeUpstream, **limits: int) -> ChannelTransport:
    return ChannelTransport(
        upstream.base_url,
        max_connections=limits.get("max_connections", 10),
        max_idle=limits.get("max_idle", 10),
        keepalive_expiry=30.0,
    )


def raw_request(upstream: FakeUpstream, timeouts: dict[str, float | None] | None = None) -> httpcore.Request:
    body = orjson.dumps(CHAT)
    return httpcore.Request(
        b"POST",
        httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=upstream.port, target=b"/v1/chat/completions"),
        headers=[
            (b"host", f"127.0.0.1:{upstream.port}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ],
        content=body,
        extensions={"timeout": timeouts or {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}},
    )


async def read(opened: tuple[httpcore.Response, UpstreamBody]) -> tuple[int, bytes]:
    response, body = opened
    try:
        content = b"".join([part async for part in body])
    finally:
        await body.aclose()
    return response.status, content


async def test_it_is_an_httpx_transport_and_reuses_one_connection(upstream: FakeUpstream) -> None:
    pool = transport(upstream)
    async with httpx.AsyncClient(transport=pool, base_url=upstream.base_url) as client:
        for _ in range(5):
            response = await client.post("/chat/completions", json=CHAT)
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == 3
        stats = pool.stats()
        assert (stats.connections, stats.idle, stats.in_flight) == (1, 1, 0)


async def fetch(pool: ChannelTransport, upstream: FakeUpstream) -> tuple[int, bytes]:
    return await read(await pool.open(raw_request(upstream)))


async def test_the_connection_limit_queues_requests_instead_of_opening_more(upstream: FakeUpstream) -> None:
    upstream.configure(latency_ms=50)
    pool = transport(upstream, max_connections=2)
    try:
        burst = [asyncio.create_task(fetch(pool, upstream)) for _ in range(6)]
        await asyncio.sleep(0.02)
        stats = pool.stats()
        assert (stats.connections, stats.in_flight, stats.waiting) == (2, 2, 4)
        results = await asyncio.gather(*burst)
        assert all(status == 200 for status, _ in results)
        assert pool.stats().connections == 2
        assert upstream.stats()["requests_total"] == 6
    finally:
        await pool.aclose()


async def test_waiting_for_a_connection_is_bounded_by_the_pool_timeout(upstream: FakeUpstream) -> None:
    upstream.configure(latency_ms=500)
    pool = transport(upstream, max_connections=1)
    try:
        first = asyncio.create_task(pool.open(raw_request(upstream)))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await pool.open(raw_request(upstream, {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 0.1}))
        assert (await read(await first))[0] == 200
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        ({"drop_connection": True}, httpx.RemoteProtocolError),
        ({"hang": True}, httpx.ReadTimeout),
    ],
)
async def test_upstream_failures_are_httpx_errors_and_free_the_slot(
    upstream: FakeUpstream, behaviour: dict[str, bool], error: type[Exception]
) -> None:
    upstream.configure(fail_count=1, **behaviour)
    pool = transport(upstream, max_connections=1)
    try:
        with pytest.raises(error):
            await pool.open(raw_request(upstream, {"connect": 1.0, "read": 0.3, "write": 1.0, "pool": 1.0}))
        assert pool.stats().in_flight == 0
        assert (await read(await pool.open(raw_request(upstream))))[0] == 200
    finally:
        await pool.aclose()


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = ChannelTransport(f"http://127.0.0.1:{port}/v1", max_connections=1, max_idle=1, keepalive_expiry=5)
    async with httpx.AsyncClient(transport=pool) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/v1/models")
    assert pool.stats().connections == 0


async def test_a_keepalive_connection_the_server_closed_is_not_reused() -> None:
    # A server that answers one request per connection, then closes it without saying so.
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = ChannelTransport(f"http://127.0.0.1:{port}", max_connections=4, max_idle=4, keepalive_expiry=30)
    try:
        async with httpx.AsyncClient(transport=pool) as client:
            for _ in range(3):
                response = await client.get(f"http://127.0.0.1:{port}/")
                assert response.text == "ok"
                await asyncio.sleep(0.05)  # let the FIN arrive
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_the_pool_lets_in_flight_requests_finish(upstream: FakeUpstream) -> None:
    upstream.configure(latency_ms=100)
    pool = transport(upstream)
    in_flight = asyncio.create_task(pool.open(raw_request(upstream)))
    await asyncio.sleep(0.03)
    await pool.aclose()
    assert (await read(await in_flight))[0] == 200
    assert pool.stats().connections == 0
    with pytest.raises(httpx.ConnectError):
        await pool.open(raw_request(upstream))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        message = "the openssl command is needed to make a test certificate"
        if os.environ.get("RELAYGATE_REQUIRE_INFRA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(f"{message} (a failure when RELAYGATE_REQUIRE_INFRA=1)")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2-offered"])
async def test_https_upstreams_use_the_loops_tls(tls_files: tuple[str, str], http2: bool) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["http/1.1"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cafile=cert)
    pool = ChannelTransport(
        f"https://127.0.0.1:{port}/v1",
        max_connections=2,
        max_idle=2,
        keepalive_expiry=30,
        http2=http2,
        ssl_context=client_context,
    )
    try:
        async with httpx.AsyncClient(transport=pool) as client:
            for _ in range(3):
                response = await client.get(f"https://127.0.0.1:{port}/v1/models")
                assert response.text == "secure"
            assert pool.stats().connections == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_an_untrusted_certificate_is_a_connect_error(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    pool = ChannelTransport(f"https://127.0.0.1:{port}", max_connections=1, max_idle=1, keepalive_expiry=5)
    try:
        async with httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"https://127.0.0.1:{port}/")
    finally:
        server.close()
        await server.wait_closed()
