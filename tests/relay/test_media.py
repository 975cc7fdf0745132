"""Image URLs fetched for Gemini channels: which addresses are refused, and the fetch itself against a
real server on loopback (redirects, the size cap, content types, pinning to the checked address)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.common.errors import InvalidRequest
from services.common.tls import CA_FILE, CERT_FILE, KEY_FILE, RELAY, server_name
from services.relay.pipeline.media import inline_images, remote_images
from services.relay.settings import RelaySettings
from services.relay.upstream.fetch import FetchPolicy, FetchRefused, ImageFetcher, checked_address, refusal
from tests.tls import certificates

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("4000::1", "reserved"),
        ("100.64.0.1", "not globally routable"),
        ("2001:db8::1", "private"),
        # IPv4 carried in IPv6 is judged as the IPv4 address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:a9fe:a9fe::1", "link-local"),
    ],
)
def test_refused_addresses(address: str, reason: str) -> None:
    assert refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_one_private_answer_refuses_the_host() -> None:
    assert str(checked_address("images.example", ["93.184.216.34", "2606:4700::1"])) == "93.184.216.34"
    with pytest.raises(FetchRefused, match="private address"):
        checked_address("images.example", ["93.184.216.34", "10.0.0.5"])
    with pytest.raises(FetchRefused, match="loopback"):
        checked_address("images.example", ["2606:4700::1", "::ffff:127.0.0.1"])
    with pytest.raises(FetchRefused, match="did not resolve"):
        checked_address("images.example", [])


# --- the fetch, against a server on loopback -------------------------------------------------------

Route = tuple[int, dict[str, str], bytes]


class ImageServer:
    """A bare HTTP/1.1 server answering each path with a fixed status, headers and body."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hosts: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            self.hosts += [line[5:].strip() for line in head if line.lower().startswith("host:")]
            status, headers, body = self.routes.get(path, (404, {}, b""))
            lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    running = ImageServer()
    await running.start()
    yield running
    await running.close()


def resolver(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, _port: int) -> list[str]:
        return table.get(host, [])

    return resolve


def fetcher(
    *,
    hosts: dict[str, list[str]] | None = None,
    allow: frozenset[str] = frozenset({"127.0.0.1"}),
    **policy: Any,
) -> ImageFetcher:
    return ImageFetcher(
        FetchPolicy(allow_http=True, allow_hosts=allow, **policy),
        resolver=resolver(hosts or {}),
    )


async def test_an_image_is_fetched_from_the_checked_address(server: ImageServer) -> None:
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    images = fetcher(hosts={"images.test": ["127.0.0.1"]}, allow=frozenset({"images.test"}))
    try:
        got = await images.fetch(f"http://images.test:{server.port}/cat.png")
    finally:
        await images.aclose()
    assert (got.media_type, got.data) == ("image/png", PNG)
    # Connected to the resolved address, the name kept in Host.
    assert server.hosts == [f"images.test:{server.port}"]


async def test_loopback_is_refused_unless_allowed(server: ImageServer) -> None:
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    images = fetcher(hosts={"localhost": ["127.0.0.1"]}, allow=frozenset())
    try:
        for url in (f"http://127.0.0.1:{server.port}/cat.png", f"http://localhost:{server.port}/cat.png"):
            with pytest.raises(FetchRefused, match="loopback"):
                await images.fetch(url)
        with pytest.raises(FetchRefused, match="did not resolve"):
            await images.fetch("http://nowhere.test/cat.png")
    finally:
        await images.aclose()
    assert server.hosts == []


async def test_http_is_refused_by_default() -> None:
    images = ImageFetcher(FetchPolicy(allow_hosts=frozenset({"127.0.0.1"})))
    try:
        with pytest.raises(FetchRefused, match="must be https, not http"):
            await images.fetch("http://127.0.0.1:9/cat.png")
        with pytest.raises(FetchRefused, match="not file"):
            await images.fetch("file:///etc/passwd")
    finally:
        await images.aclose()


async def test_redirects_are_checked_and_bounded(server: ImageServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    server.routes["/moved"] = (302, {"Location": "/cat.png"}, b"")
    server.routes["/metadata"] = (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    server.routes["/rebind"] = (301, {"Location": f"http://inside.test:{server.port}/cat.png"}, b"")
    for hop in range(4):
        server.routes[f"/loop{hop}"] = (302, {"Location": f"/loop{hop + 1}"}, b"")
    server.routes["/loop4"] = (200, {"Content-Type": "image/png"}, PNG)
    images = fetcher(hosts={"inside.test": ["10.0.0.7"]})
    try:
        assert (await images.fetch(f"{base}/moved")).data == PNG
        with pytest.raises(FetchRefused, match="link-local address"):
            await images.fetch(f"{base}/metadata")
        with pytest.raises(FetchRefused, match="private address"):
            await images.fetch(f"{base}/rebind")
        with pytest.raises(FetchRefused, match="redirected more than 3 times"):
            await images.fetch(f"{base}/loop0")
    finally:
        await images.aclose()


async def test_size_cap_and_content_type(server: ImageServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    server.routes["/big.png"] = (200, {"Content-Type": "image/png"}, PNG)
    server.routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html></html>")
    server.routes["/svg"] = (200, {"Content-Type": "image/svg+xml"}, b"<svg/>")
    server.routes["/gone"] = (404, {"Content-Type": "image/png"}, b"")
    images = fetcher(max_bytes=len(PNG) - 1)
    try:
        with pytest.raises(FetchRefused, match=f"larger than {len(PNG) - 1} bytes"):
            await images.fetch(f"{base}/big.png")
        with pytest.raises(FetchRefused, match="'text/html' is not one of"):
            await images.fetch(f"{base}/page")
        with pytest.raises(FetchRefused, match="'image/svg\\+xml' is not one of"):
            await images.fetch(f"{base}/svg")
        with pytest.raises(FetchRefused, match="answered 404"):
            await images.fetch(f"{base}/gone")
    finally:
        await images.aclose()


async def test_a_slow_server_runs_out_of_time() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    slow = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = slow.sockets[0].getsockname()[1]
    images = fetcher(timeout_s=0.3)
    try:
        with pytest.raises(FetchRefused, match=r"within 0\.3 s"):
            await images.fetch(f"http://127.0.0.1:{port}/cat.png")
    finally:
        await images.aclose()
        slow.close()


async def test_a_chat_body_gets_its_images_inline(server: ImageServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    server.routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html></html>")
    files_uri = "https://generativelanguage.googleapis.com/v1beta/files/abc"
    body: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": f"{base}/cat.png", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": files_uri}},
                ],
            },
        ],
    }
    assert [where for where, _ in remote_images(body)] == ["messages[1].content[1]"]
    images = fetcher()
    try:
        inlined = await inline_images(body, images)
        assert inlined is not None
        part = inlined["messages"][1]["content"][1]["image_url"]
        assert part == {"url": f"data:image/png;base64,{base64.b64encode(PNG).decode()}", "detail": "low"}
        assert inlined["messages"][1]["content"][2]["image_url"]["url"] == files_uri
        # The caller's body is left as it came.
        assert body["messages"][1]["content"][1]["image_url"]["url"] == f"{base}/cat.png"
        assert await inline_images({"messages": [{"role": "user", "content": "hi"}]}, images) is None

        body["messages"][1]["content"][1]["image_url"]["url"] = f"{base}/page"
        with pytest.raises(
            InvalidRequest, match=r"messages\[1\]\.content\[1\]: the image URL cannot be used"
        ):
            await inline_images(body, images)
    finally:
        await images.aclose()


async def test_tls_is_checked_against_the_name_not_the_pinned_address() -> None:
    identity = certificates().directory(RELAY)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(identity / CERT_FILE, identity / KEY_FILE)
    server = ImageServer()
    server.routes["/cat.png"] = (200, {"Content-Type": "image/png"}, PNG)
    await server.start(served)
    name = server_name(RELAY)
    images = ImageFetcher(
        FetchPolicy(allow_hosts=frozenset({name, "other.test"})),
        resolver=resolver({name: ["127.0.0.1"], "other.test": ["127.0.0.1"]}),
        verify=ssl.create_default_context(cafile=str(identity / CA_FILE)),
    )
    try:
        # Connected to 127.0.0.1, the certificate checked against the URL's name (SNI and all).
        assert (await images.fetch(f"https://{name}:{server.port}/cat.png")).data == PNG
        # The same address under a name the certificate does not carry is not trusted.
        with pytest.raises(FetchRefused, match="could not be fetched"):
            await images.fetch(f"https://other.test:{server.port}/cat.png")
    finally:
        await images.aclose()
        await server.close()


def test_settings_read_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYGATE_FETCH_ALLOW_HOSTS", "127.0.0.1, Images.Internal")
    monkeypatch.setenv("RELAYGATE_FETCH_IMAGE_TYPES", "image/png,image/jpeg")
    settings = RelaySettings()
    assert settings.fetch_allow_hosts == ["127.0.0.1", "images.internal"]
    assert settings.fetch_image_types == ["image/png", "image/jpeg"]
    assert not settings.fetch_allow_http and settings.fetch_max_redirects == 3
    monkeypatch.delenv("RELAYGATE_FETCH_ALLOW_HOSTS")
    assert RelaySettings().fetch_allow_hosts == []
